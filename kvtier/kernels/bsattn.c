/* Decode attention on the micro-scaled block formats' blocks (OCP MX and NVIDIA NV:
 * kvtier.kv.codecs.blockscaled), in fp32.
 *
 * One call covers one run of consecutive blocks of one layer, all KV heads. Per KV head and
 * block of B tokens, keys and values alike:
 *   codes   B rows of D elements, 4-bit codes packed in planes (kvtier.kv.codecs.packing) or
 *           one byte each;
 *   scales  one byte per token and `eblock` elements (E8M0 or FP8 E4M3);
 *   tensor  NV only: one fp32 scale per KV block and head, times every E4M3 scale.
 * An element decodes by lookup, elut[code] (the E2M1 or INT4 grid, or the 256 values of an
 * INT8 or E4M3 byte), times its scale, slut[scale byte] (times the tensor scale): nothing but
 * codes is read from the cache and no dense block is written to memory. A Hadamard rotation
 * of the head dimension (hadamard=true) commutes with the dot product and is applied to the
 * query and the output by the caller. For the R query rows of a head (pre-scaled) it returns
 * the softmax pieces m, l, o that kvtier.attention.blockwise.merge combines; work is split over
 * (head, run of blocks) tasks. kvtier.kv.codecs.blockscaled.BlockScaled.attend_torch is the
 * reference this is tested against.
 */
#include "spans.h"

enum { KC, KS, KT, VC, VS, VT, BFIELDS };  /* the fields, in Python's order (KT, VT: NV only) */

typedef struct {
    int n_kv, rows, d, bits, eblock, block, n_blocks;
    const void *const *p; const long *hs;  /* each field's base and head stride (elements) */
    const float *elut, *slut;              /* element values by code, scale values by byte */
    int byte;                              /* 8-bit codes: what elut holds (byte_kind) */
} BJob;

/* What the 256 values of a one-byte element hold: a multiple of the signed byte (INT8), an
 * affine map of the unsigned byte (bfp's mantissa minus its offset), the FP8 E4M3 values, or
 * anything else (looked up one by one). Checked once per call, so the vector decoders below
 * are exact for any table they are used on. */
enum { BYTE_TABLE, BYTE_INT8, BYTE_AFFINE, BYTE_E4M3 };

static float e4m3_value(int c) {
    const int e = (c >> 3) & 15, m = c & 7;
    const float v = e ? ldexpf(1.f + m / 8.f, e - 7) : ldexpf(m, -9);
    return c & 128 ? -v : v;
}

static int byte_kind(const float *elut) {
    int int8 = 1, affine = 1, e4m3 = 1;
    for (int c = 0; c < 256; c++) {
        if (elut[c] != (float)(int8_t)c * elut[1]) int8 = 0;
        if (elut[c] != elut[0] + c * (elut[1] - elut[0])) affine = 0;
        if ((c & 127) != 127 && elut[c] != e4m3_value(c)) e4m3 = 0;  /* 0x7f, 0xff: NaN, never stored */
    }
    return int8 ? BYTE_INT8 : affine ? BYTE_AFFINE : e4m3 ? BYTE_E4M3 : BYTE_TABLE;
}

#ifdef __AVX512F__
/* 16 E4M3 bytes -> fp32: a normal (e > 0) moves its exponent and mantissa bits into place and
 * rebiases (7 -> 127); a subnormal is m * 2^-9 */
RINLINE __m512 e4m3_16(const uint8_t *c8) {
    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c8));
    const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi32(127));
    const __m512i normal = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
    const __mmask16 sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
    __m512 v = _mm512_mask_mul_ps(_mm512_castsi512_ps(normal), sub, _mm512_cvtepi32_ps(mag), _mm512_set1_ps(0x1p-9f));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(128)), 24)));
}
#endif

#define BAT(J, T, f, h, b, per) ((const T *)(J)->p[f] + (h) * (J)->hs[f] + (long)(b) * (per))

/* block b of head h of field f (codes at f, scales at f+1, tensor scale at f+2): B rows of D */
RINLINE void decode_block(const BJob *J, const int f, const int h, const int b, float *restrict out,
                          const nvf table, const int D, const int B, const int bits) {
    const int P = D * bits / 8, E = J->eblock, ne = D / E;
    const float g = J->p[f + 2] ? *BAT(J, float, f + 2, h, b, 1) : 1.f;
    const uint8_t *codes = BAT(J, uint8_t, f, h, b, B * P), *s8 = BAT(J, uint8_t, f + 1, h, b, B * ne);
#ifdef __AVX512F__
    /* 16 elements a vector, each vector inside one scale block: its scale multiplies it in
     * registers (4-bit: the in-register table; 8-bit: a gather from the 256-entry table) */
    if (E % 16 == 0 && (bits == 8 ? D % 16 == 0 : D % 32 == 0)) {
        for (int t = 0; t < B; t++) {
            float *row = out + t * D;
            const uint8_t *c8 = codes + (long)t * P, *st = s8 + t * ne;
            if (bits == 4) {
                const int m = D / 2;
                for (int j = 0; j < m; j += 16) {
                    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c8 + j)));
                    const __m512i lo = _mm512_and_si512(x, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(x, 4);
                    _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_permutexvar_ps(lo, (__m512)table),
                                                            _mm512_set1_ps(J->slut[st[j / E]] * g)));
                    _mm512_storeu_ps(row + m + j, _mm512_mul_ps(_mm512_permutexvar_ps(hi, (__m512)table),
                                                                _mm512_set1_ps(J->slut[st[(m + j) / E]] * g)));
                }
            } else if (J->byte == BYTE_INT8)
                for (int c = 0; c < D; c += 16) {
                    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c8 + c))));
                    _mm512_storeu_ps(row + c, _mm512_mul_ps(x, _mm512_set1_ps(J->elut[1] * J->slut[st[c / E]] * g)));
                }
            else if (J->byte == BYTE_AFFINE)
                for (int c = 0; c < D; c += 16) {
                    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c8 + c))));
                    const float a = J->slut[st[c / E]] * g;
                    _mm512_storeu_ps(row + c, _mm512_fmadd_ps(x, _mm512_set1_ps((J->elut[1] - J->elut[0]) * a),
                                                              _mm512_set1_ps(J->elut[0] * a)));
                }
            else if (J->byte == BYTE_E4M3)
                for (int c = 0; c < D; c += 16)
                    _mm512_storeu_ps(row + c, _mm512_mul_ps(e4m3_16(c8 + c), _mm512_set1_ps(J->slut[st[c / E]] * g)));
            else
                for (int c = 0; c < D; c++) row[c] = J->elut[c8[c]] * J->slut[st[c / E]] * g;
        }
        return;
    }
#endif
    for (int t = 0; t < B; t++) {
        float *row = out + t * D;
        const uint8_t *c8 = codes + (long)t * P;
        if (bits == 4)
            unpack_row(c8, J->elut, table, row, D, 4);
        else
            for (int c = 0; c < D; c++) row[c] = J->elut[c8[c]];
        for (int e = 0; e < ne; e++) {
            const float a = J->slut[s8[t * ne + e]] * g;
            for (int c = e * E; c < (e + 1) * E; c++) row[c] *= a;
        }
    }
}

/* one head's pieces over blocks [b0, b1); R, D, B and bits are compile-time constants in the
 * specialised calls of span() */
RINLINE void span_of(const BJob *J, const float *q, int h, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                     const int R, const int D, const int B, const int bits) {
    float kb[RMAXB * RMAXD], vb[RMAXB * RMAXD], s[RMAXR * RMAXB], mr[RMAXR], lr[RMAXR];
    for (int r = 0; r < R; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(o, 0, sizeof(float) * R * D);
    nvf table;
    for (int c = 0; c < 16; c++) table[c] = bits == 4 ? J->elut[c] : 0.f;
    for (int b = b0; b < b1; b++) {
        decode_block(J, KC, h, b, kb, table, D, B, bits);
        block_scores(kb, q, s, R, D, B);
        online_softmax_from(s, mr, lr, o, R, D, B, b == b0 ? skip : 0);
        decode_block(J, VC, h, b, vb, table, D, B, bits);
        weighted_sum(o, s, vb, R, D, B, D);
    }
    for (int r = 0; r < R; r++) { m_out[r] = mr[r]; l_out[r] = lr[r]; }
}

static void span(const void *job, const float *q, int h, int b0, int b1, int skip, float *m, float *l, float *o) {
    const BJob *J = job;
    const int R = J->rows, D = J->d, B = J->block, bits = J->bits;
#define SHAPE(r, d, b, k) if (R == r && D == d && B == b && bits == k) { span_of(J, q, h, b0, b1, skip, m, l, o, r, d, b, k); return; }
    SHAPE(3, 64, 64, 4) SHAPE(3, 64, 64, 8)     /* SmolLM2: 9 query heads over 3 KV heads */
    SHAPE(4, 256, 64, 4) SHAPE(4, 256, 64, 8)   /* Gemma 3: 4 query heads over 1 KV head */
#undef SHAPE
    span_of(J, q, h, b0, b1, skip, m, l, o, R, D, B, bits);
}

/* The job of a run of blocks: 0, or 1 when the sizes are outside what this kernel handles. */
static int job_of(BJob *J, int n_kv, int rows, int d, int bits, int eblock, int block, int n_blocks,
                  const void *const *ptrs, const long *strides, const float *elut, const float *slut) {
    if (d > RMAXD || rows > RMAXR || block > RMAXB || (bits != 4 && bits != 8) || eblock < 1 || d % eblock
        || (d * bits) % 8 || n_blocks < 1)
        return 1;
    *J = (BJob){n_kv, rows, d, bits, eblock, block, n_blocks, ptrs, strides, elut, slut,
                bits == 8 ? byte_kind(elut) : BYTE_TABLE};
    return 0;
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles (the caller falls back). */
int kvtier_blockscaled_attend(const float *q, int n_kv, int rows, int d, int bits, int eblock, int block,
                              int n_blocks, const void *const *ptrs, const long *strides, const float *elut,
                              const float *slut, float *m, float *l, float *o, int threads) {
    BJob J;
    if (job_of(&J, n_kv, rows, d, bits, eblock, block, n_blocks, ptrs, strides, elut, slut)) return 1;
    return run_spans(&J, span, q, n_kv, rows, d, n_blocks, m, l, o, threads);
}

/* The same run as a job for batched.c's SPAN parts, or NULL; and the span function it goes
 * with. The arrays and tables it points to must outlive it. */
void *kvtier_blockscaled_job(int n_kv, int rows, int d, int bits, int eblock, int block, int n_blocks,
                             const void *const *ptrs, const long *strides, const float *elut, const float *slut) {
    BJob J;
    return job_copy(&J, sizeof J, job_of(&J, n_kv, rows, d, bits, eblock, block, n_blocks, ptrs, strides, elut, slut));
}

void *kvtier_blockscaled_span(void) { return (void *)span; }
