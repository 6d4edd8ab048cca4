/* Encoding and decoding of the `int` codec (KIVI's asymmetric quantization, bits 2, 4 and 8):
 * the same numbers as the PyTorch encoder and decoder they stand beside
 * (kvtier.kv.codecs.intq.quantize and packing.pack; Int.decode_torch), tested equal to the bit. Blocks of B tokens (h, n, B, D), bf16 or fp32:
 *   keys    per channel over the block's tokens; codes packed in planes along the channels and
 *           stored channel-major, k[h, n, j, t] (byte row j holds channel i*m + j in plane i);
 *   values  per token over groups of `group` channels, packed the same way, token-major.
 * A (scale, zero) pair: lo, hi the slice's min and max; scale = fp16((hi - lo) / (2^b - 1)),
 * zero = fp16(lo); code = clamp(round_half_even((x - zero) / scale), 0, 2^b - 1), with scale 1
 * where it is 0. Compiled without -ffast-math's shortcuts: the division must stay a division
 * (gcc would multiply by a hoisted reciprocal) and rounding must be to nearest even. */
#pragma GCC optimize("no-fast-math")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline float element(const void *x, long i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* scale and zero of one slice (min lo, max hi), as fp16; the divisor used for its codes */
static inline float pair(float lo, float hi, int levels, _Float16 *scale, _Float16 *zero, float *zf) {
    *scale = (_Float16)((hi - lo) / (float)levels);
    *zero = (_Float16)lo;
    *zf = (float)*zero;
    return (float)*scale > 0.f ? (float)*scale : 1.f;
}

static inline uint8_t code(float x, float zf, float safe, int levels) {
    float c = nearbyintf((x - zf) / safe);
    c = c < 0.f ? 0.f : c;
    c = c > (float)levels ? (float)levels : c;
    return (uint8_t)c;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The same numbers 16 channels at a time: IEEE division and round-to-nearest-even are exact in
 * the vector units too (vdivps, vrndscaleps, vcvtps2ph), so the bytes do not change.
 *
 * fp16 scale and zero of 16 slices (min lo, max hi) stored at s16, z16; returns the divisor
 * (the fp16 scale, or 1 where it is not above 0) and sets *zf to the fp16 zero as fp32 */
static inline __m512 pair16(__m512 lo, __m512 hi, __m512 levels, _Float16 *s16, _Float16 *z16, __m512 *zf) {
    const __m256i s = _mm512_cvtps_ph(_mm512_div_ps(_mm512_sub_ps(hi, lo), levels),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i z = _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256((__m256i *)s16, s);
    _mm256_storeu_si256((__m256i *)z16, z);
    *zf = _mm512_cvtph_ps(z);
    const __m512 sf = _mm512_cvtph_ps(s);
    return _mm512_mask_mov_ps(_mm512_set1_ps(1.f), _mm512_cmp_ps_mask(sf, _mm512_setzero_ps(), _CMP_GT_OQ), sf);
}

static inline __m128i code16(__m512 x, __m512 zf, __m512 safe, __m512 levels) {
    __m512 c = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(x, zf), safe),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    c = _mm512_min_ps(_mm512_max_ps(c, _mm512_setzero_ps()), levels);
    return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c));
}

/* packed byte row j (16 at a time) of one token's codes: plane i holds channel i*m + j */
static inline void pack_row(const uint8_t *codes, int m, int planes, int bits, uint8_t *out) {
    for (int j = 0; j < m; j += 16) {
        __m128i byte = _mm_loadu_si128((const __m128i *)(codes + j));
        for (int i = 1; i < planes; i++)  /* a code shifted by i*bits stays inside its byte */
            byte = _mm_or_si128(byte, _mm_slli_epi16(_mm_loadu_si128((const __m128i *)(codes + i * m + j)), i * bits));
        _mm_storeu_si128((__m128i *)(out + j), byte);
    }
}

static void encode_block16(const void *k, long kbase, long kst, const void *v, long vbase, long vst, int bf16,
                           long blk, long B, long D, int bits, int group,
                           uint8_t *kp, _Float16 *ks, _Float16 *kz, uint8_t *vp, _Float16 *vs, _Float16 *vz) {
    const int planes = 8 / bits, m = (int)(D / planes), mb = (int)(D * bits / 8);
    const __m512 levels = _mm512_set1_ps((float)((1 << bits) - 1));
    const long ng = D / group;
    uint8_t codes[4096], rows[4096];
    uint8_t *kb = kp + blk * mb * B;
    /* keys: each channel over the block's tokens, then one token's packed row at a time,
     * transposed into the channel-major block in runs of up to 64 tokens */
    __m512 zf[256], safe[256];
    for (long c = 0; c < D; c += 16) {
        __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
        for (long t = 0; t < B; t++) {
            const __m512 x = load16_as_float(k, kbase + t * kst + c, bf16);
            lo = _mm512_min_ps(x, lo);
            hi = _mm512_max_ps(x, hi);
        }
        safe[c / 16] = pair16(lo, hi, levels, &ks[blk * D + c], &kz[blk * D + c], &zf[c / 16]);
    }
    const long run = 4096 / m < 64 ? 4096 / m : 64;  /* tokens whose packed rows fit in `rows` */
    for (long t0 = 0; t0 < B; t0 += run) {
        const long nt = B - t0 < run ? B - t0 : run;
        for (long t = 0; t < nt; t++) {
            for (long c = 0; c < D; c += 16)
                _mm_storeu_si128((__m128i *)(codes + c),
                                 code16(load16_as_float(k, kbase + (t0 + t) * kst + c, bf16), zf[c / 16], safe[c / 16], levels));
            pack_row(codes, m, planes, bits, rows + t * m);
        }
        for (int j = 0; j < m; j++)
            for (long t = 0; t < nt; t++) kb[(long)j * B + t0 + t] = rows[t * m + j];
    }
    /* values: each token over groups of channels */
    for (long t = 0; t < B; t++) {
        const long row = vbase + t * vst;
        for (long g = 0; g < ng; g++) {
            __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
            for (long c = g * group; c < (g + 1) * group; c += 16) {
                const __m512 x = load16_as_float(v, row + c, bf16);
                lo = _mm512_min_ps(x, lo);
                hi = _mm512_max_ps(x, hi);
            }
            float z;
            const long at = (blk * B + t) * ng + g;
            const float s = pair(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), (1 << bits) - 1, &vs[at], &vz[at], &z);
            const __m512 zv = _mm512_set1_ps(z), sv = _mm512_set1_ps(s);
            for (long c = g * group; c < (g + 1) * group; c += 16)
                _mm_storeu_si128((__m128i *)(codes + c), code16(load16_as_float(v, row + c, bf16), zv, sv, levels));
        }
        pack_row(codes, m, planes, bits, vp + (blk * B + t) * mb);
    }
}
#endif

/* k, v (h, n, B, D): the element (head i, token j of the n*B, channel c) at i*sh + j*st + c
 * (rows of D contiguous, heads and tokens strided: a view of the model's packed rows); outputs as the codec's fields (kvtier.kv.codecs.intq.Int.fields)
 * for n blocks of each head: kp (h, n, D*bits/8, B), ks, kz (h, n, D), vp (h, n, B, D*bits/8),
 * vs, vz (h, n, B, D/group). Returns 0, or -1 for sizes it does not take. */
int kvtier_int_encode(const void *k, int64_t ksh, int64_t kst, const void *v, int64_t vsh, int64_t vst, int bf16,
                      int64_t h, int64_t n, int64_t B, int64_t D,
                      int bits, int group, uint8_t *kp, _Float16 *ks, _Float16 *kz,
                      uint8_t *vp, _Float16 *vs, _Float16 *vz, int threads) {
    if ((bits != 2 && bits != 4 && bits != 8) || B < 1 || D < 1 || group < 1 || D % group
        || D % (8 / bits) || D > 4096)
        return -1;
    const int levels = (1 << bits) - 1, planes = 8 / bits, m = (int)(D / planes), mb = (int)(D * bits / 8);
    const long blocks = h * n;
    #pragma omp parallel for schedule(static) num_threads(threads) if (blocks * B * D >= 65536)
    for (long blk = 0; blk < blocks; blk++) {
        const long head = blk / n, first = blk % n * B;  /* the block's first token */
        const long kbase = head * ksh + first * kst, vbase = head * vsh + first * vst;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if (D % 16 == 0 && group % 16 == 0 && m % 16 == 0) {
            encode_block16(k, kbase, kst, v, vbase, vst, bf16, blk, B, D, bits, group, kp, ks, kz, vp, vs, vz);
            continue;
        }
#endif
        uint8_t codes[4096];
        /* keys: each channel over the block's tokens */
        float lo[4096], hi[4096], zf[4096], safe[4096];
        for (long c = 0; c < D; c++) { lo[c] = INFINITY; hi[c] = -INFINITY; }
        for (long t = 0; t < B; t++)
            for (long c = 0; c < D; c++) {
                const float x = element(k, kbase + t * kst + c, bf16);
                lo[c] = x < lo[c] ? x : lo[c];
                hi[c] = x > hi[c] ? x : hi[c];
            }
        for (long c = 0; c < D; c++)
            safe[c] = pair(lo[c], hi[c], levels, &ks[blk * D + c], &kz[blk * D + c], &zf[c]);
        uint8_t *kb = kp + blk * mb * B;
        for (long t = 0; t < B; t++) {
            for (long c = 0; c < D; c++) codes[c] = code(element(k, kbase + t * kst + c, bf16), zf[c], safe[c], levels);
            for (int j = 0; j < m; j++) {  /* byte row j, token t */
                unsigned byte = 0;
                for (int i = 0; i < planes; i++) byte |= (unsigned)codes[i * m + j] << (i * bits);
                kb[(long)j * B + t] = (uint8_t)byte;
            }
        }
        /* values: each token over groups of channels */
        const long ng = D / group;
        for (long t = 0; t < B; t++) {
            const long row = vbase + t * vst;
            for (long g = 0; g < ng; g++) {
                float l = INFINITY, u = -INFINITY;
                for (long c = g * group; c < (g + 1) * group; c++) {
                    const float x = element(v, row + c, bf16);
                    l = x < l ? x : l;
                    u = x > u ? x : u;
                }
                float z;
                const long at = (blk * B + t) * ng + g;
                const float s = pair(l, u, levels, &vs[at], &vz[at], &z);
                for (long c = g * group; c < (g + 1) * group; c++) codes[c] = code(element(v, row + c, bf16), z, s, levels);
            }
            uint8_t *out = vp + (blk * B + t) * mb;
            for (int j = 0; j < m; j++) {
                unsigned byte = 0;
                for (int i = 0; i < planes; i++) byte |= (unsigned)codes[i * m + j] << (i * bits);
                out[j] = (uint8_t)byte;
            }
        }
    }
    return 0;
}

/* The inverse: the `int` codec's fields for n blocks of each head -> k, v (h, n * B, D), bf16 or
 * fp32, the numbers of kvtier.kv.codecs.intq.Int.decode: zero + code * scale in fp32 (the
 * product of a code of at most 8 bits and an fp16 scale is exact, so fused or not the one
 * rounding is the sum's), then rounded to bf16 to nearest even. Fields as the encoder writes
 * them; within a head a field's blocks are contiguous, heads `ksh` (k codes), `kssh` (k scale and
 * zero), `vsh`, `vssh` elements apart. Returns 0, or -1 for sizes it does not take. */
int kvtier_int_decode(const uint8_t *kp, const _Float16 *ks, const _Float16 *kz, const uint8_t *vp,
                      const _Float16 *vs, const _Float16 *vz, int64_t ksh, int64_t kssh, int64_t vsh, int64_t vssh,
                      int64_t h, int64_t n, int64_t B, int64_t D, int bits, int group, int bf16,
                      void *ko, void *vo, int threads) {
    if ((bits != 2 && bits != 4 && bits != 8) || B < 1 || D < 16 || D % 16 || group < 16 || group % 16
        || D % group || D > 4096)
        return -1;
    const int planes = 8 / bits, m = (int)(D / planes), mb = (int)(D * bits / 8);
    if (m % 16) return -1;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const long blocks = h * n, ng = D / group;
    const __m128i mask = _mm_set1_epi8((char)((1 << bits) - 1));
    #pragma omp parallel for schedule(static) num_threads(threads) if (blocks * B * D >= 65536)
    for (long blk = 0; blk < blocks; blk++) {
        const long head = blk / n, b = blk % n;
        const uint8_t *kb = kp + head * ksh + b * mb * B, *vb = vp + head * vsh + b * B * mb;
        const _Float16 *s = ks + head * kssh + b * D, *z = kz + head * kssh + b * D;
        const long out0 = (head * n + b) * B;  /* the block's first row in (h, n * B, D) */
        uint8_t rows[4096];
        /* keys: channel-major byte rows -> one token's packed row at a time */
        const long run = 4096 / m < 64 ? 4096 / m : 64;  /* tokens whose packed rows fit in `rows` */
        for (long t0 = 0; t0 < B; t0 += run) {
            const long nt = B - t0 < run ? B - t0 : run;
            for (int j = 0; j < m; j++)
                for (long t = 0; t < nt; t++) rows[t * m + j] = kb[(long)j * B + t0 + t];
            for (long t = 0; t < nt; t++)
                for (int j = 0; j < m; j += 16) {
                    const __m128i byte = _mm_loadu_si128((const __m128i *)(rows + t * m + j));
                    for (int i = 0; i < planes; i++) {
                        const long c = (long)i * m + j;
                        const __m128i code = _mm_and_si128(_mm_srli_epi16(byte, i * bits), mask);
                        const __m512 sf = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + c)));
                        const __m512 zf = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z + c)));
                        store16_from_float(ko, (out0 + t0 + t) * D + c,
                                  _mm512_add_ps(zf, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(code)), sf)), bf16);
                    }
                }
        }
        /* values: token-major rows, a scale and zero per group of channels */
        for (long t = 0; t < B; t++) {
            const _Float16 *sv = vs + head * vssh + (b * B + t) * ng, *zv = vz + head * vssh + (b * B + t) * ng;
            for (int j = 0; j < m; j += 16) {
                const __m128i byte = _mm_loadu_si128((const __m128i *)(vb + t * mb + j));
                for (int i = 0; i < planes; i++) {
                    const long c = (long)i * m + j, g = c / group;  /* 16 channels within one group */
                    const __m128i code = _mm_and_si128(_mm_srli_epi16(byte, i * bits), mask);
                    store16_from_float(vo, (out0 + t) * D + c,
                              _mm512_add_ps(_mm512_set1_ps((float)zv[g]),
                                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(code)),
                                                          _mm512_set1_ps((float)sv[g]))), bf16);
                }
            }
        }
    }
    return 0;
#else
    (void)kp; (void)ks; (void)kz; (void)vp; (void)vs; (void)vz; (void)ksh; (void)kssh; (void)vsh; (void)vssh;
    (void)h; (void)n; (void)B; (void)bf16; (void)ko; (void)vo; (void)threads; (void)mb;
    return -1;
#endif
}
