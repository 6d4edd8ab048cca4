/* Matmul on group-quantized weights kept packed: y = x @ W^T.
 *
 * W is (N, K), quantized in groups of 32 along K with an fp16 scale d (and for 4-bit an fp16
 * minimum m) per group, the layouts of GGUF Q8_0, Q4_0 and Q4_1:
 *   bits=8: W[n, 32g + j] = d[n, g] * codes[n, 32g + j]           (int8 codes)
 *   bits=4: W[n, 32g + j] = d[n, g] * q + m[n, g], q = codes[n, 16g + j] & 15 for j < 16
 *                                                   and codes[n, 16g + j - 16] >> 4 for j >= 16
 * The PyTorch reference beside it is kvtier.weights.quant.GroupQuant.dense (dequantize, then
 * F.linear); tests/test_weights.py checks the two agree.
 *
 * Each output row is dequantized once into an fp32 row buffer (L1-resident) and dotted with
 * every row of x, so the packed weights are read once per call whatever M is: decode of one
 * sequence and of a batch of sequences both read the weights' bytes once per step. With bf16 x
 * on a CPU with AMX, 2 to 32 rows of x are multiplied on the tile registers (rows_amx): a
 * batched decode step of 16 sequences spends 2.2x less in SmolLM2's matrices.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVT_AVX2 1
#endif

static inline float half_to_float(uint16_t h) {
#ifdef KVT_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* One row of W (K values) into out. */
static void dequant_row(const uint8_t *c, const uint16_t *d, const uint16_t *mn, int64_t K, int bits,
                        float *out) {
    int64_t groups = K / 32;
    for (int64_t g = 0; g < groups; g++) {
        float s = half_to_float(d[g]), m = mn ? half_to_float(mn[g]) : 0.0f;
        float *o = out + 32 * g;
#ifdef KVT_AVX2
        __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
        if (bits == 4) {
            __m128i q = _mm_loadu_si128((const __m128i *)(c + 16 * g));
            __m128i lo = _mm_and_si128(q, _mm_set1_epi8(15));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(15));
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int p = 0; p < 4; p++) {
                __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
                _mm256_storeu_ps(o + 8 * p, _mm256_fmadd_ps(f, vs, vm));
            }
        } else {
            const int8_t *q = (const int8_t *)c + 32 * g;
            for (int p = 0; p < 4; p++) {
                __m128i b = _mm_loadl_epi64((const __m128i *)(q + 8 * p));
                _mm256_storeu_ps(o + 8 * p, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vs));
            }
        }
#else
        if (bits == 4) {
            const uint8_t *q = c + 16 * g;
            for (int j = 0; j < 16; j++) {
                o[j] = s * (float)(q[j] & 15) + m;
                o[j + 16] = s * (float)(q[j] >> 4) + m;
            }
        } else {
            const int8_t *q = (const int8_t *)c + 32 * g;
            for (int j = 0; j < 32; j++) o[j] = s * (float)q[j];
        }
#endif
    }
}

/* y[m] = dot(w, x[m]) for rows m of x (K a multiple of 32). */
static void dot_rows(const float *w, const float *x, int64_t M, int64_t K, int64_t ldy, float *y) {
    int64_t m = 0;
#ifdef KVT_AVX2
    for (; m + 4 <= M; m += 4) {  /* four rows share each load of w */
        const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t k = 0; k < K; k += 16) {
            __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + k), a0);
            b0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x0 + k + 8), b0);
            a1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), a1);
            b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + k + 8), b1);
            a2 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x2 + k), a2);
            b2 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x2 + k + 8), b2);
            a3 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x3 + k), a3);
            b3 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x3 + k + 8), b3);
        }
        __m256 s[4] = {_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3)};
        for (int t = 0; t < 4; t++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(s[t]), _mm256_extractf128_ps(s[t], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[(m + t) * ldy] = _mm_cvtss_f32(h);
        }
    }
    for (; m < M; m++) {
        const float *xm = x + m * K;
        __m256 a = _mm256_setzero_ps(), b = a, c = a, e = a;
        for (int64_t k = 0; k < K; k += 32) {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(xm + k), a);
            b = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(xm + k + 8), b);
            c = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(xm + k + 16), c);
            e = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(xm + k + 24), e);
        }
        __m256 s = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, e));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        y[m * ldy] = _mm_cvtss_f32(h);
    }
#endif
    for (; m < M; m++) {
        const float *xm = x + m * K;
        float acc[8] = {0};
        for (int64_t k = 0; k < K; k += 8)
            for (int j = 0; j < 8; j++) acc[j] += w[k + j] * xm[k + j];
        float s = 0;
        for (int j = 0; j < 8; j++) s += acc[j];
        y[m * ldy] = s;
    }
}

#if defined(__AVX512F__) && defined(KVT_AVX2)
/* dot_packed (below) on 16-lane registers: half the instructions per group */
static float dot_packed512(const uint8_t *c, const uint16_t *d, const uint16_t *mn, const float *x,
                           const float *xsum, int64_t K, int bits) {
    int64_t groups = K / 32;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    float tail = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const float *xg = x + 32 * g;
        __m512 f0, f1;
        if (bits == 4) {
            __m128i q = _mm_loadu_si128((const __m128i *)(c + 16 * g));
            f0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, _mm_set1_epi8(15))));
            f1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(15))));
            tail += half_to_float(mn[g]) * xsum[g];
        } else {
            const int8_t *q = (const int8_t *)c + 32 * g;
            f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
            f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
        }
        __m512 t = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xg + 16), _mm512_mul_ps(f0, _mm512_loadu_ps(xg)));
        __m512 vd = _mm512_set1_ps(half_to_float(d[g]));
        if (g & 1) acc1 = _mm512_fmadd_ps(t, vd, acc1);
        else acc0 = _mm512_fmadd_ps(t, vd, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail;
}
#define DOT_PACKED dot_packed512
#else
#define DOT_PACKED dot_packed
#endif

#ifdef KVT_AVX2
/* One row of x (M = 1, a single decoding sequence): no row buffer. Each group's codes are
 * dotted with x as integers-in-floats and scaled once, d * (q . x), and the minimum's share,
 * m * sum(x over the group), comes from the group sums of x computed once per call. */
static float dot_packed(const uint8_t *c, const uint16_t *d, const uint16_t *mn, const float *x,
                        const float *xsum, int64_t K, int bits) {
    int64_t groups = K / 32;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    float tail = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const float *xg = x + 32 * g;
        __m256 f0, f1, f2, f3;
        if (bits == 4) {
            __m128i q = _mm_loadu_si128((const __m128i *)(c + 16 * g));
            __m128i lo = _mm_and_si128(q, _mm_set1_epi8(15));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(15));
            f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            f2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            f3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            tail += half_to_float(mn[g]) * xsum[g];
        } else {
            const int8_t *q = (const int8_t *)c + 32 * g;
            f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
            f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8))));
            f2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16))));
            f3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 24))));
        }
        __m256 t = _mm256_mul_ps(f0, _mm256_loadu_ps(xg));
        t = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xg + 8), t);
        t = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xg + 16), t);
        t = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xg + 24), t);
        __m256 vd = _mm256_set1_ps(half_to_float(d[g]));
        if (g & 1) acc1 = _mm256_fmadd_ps(t, vd, acc1);
        else acc0 = _mm256_fmadd_ps(t, vd, acc0);
    }
    __m256 s = _mm256_add_ps(acc0, acc1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h) + tail;
}

/* Row n of W (its codes, scales and minimums) into the cache ahead of its use: a one-row matmul
 * streams the matrix from memory once, and without it 2 threads read 6 GB/s, not 25. */
static inline void prefetch_row(const uint8_t *codes, const uint16_t *d, const uint16_t *mn, int64_t row_bytes,
                                int64_t groups, int64_t n) {
    const char *next = (const char *)(codes + n * row_bytes);
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(next + o, _MM_HINT_T0);
    _mm_prefetch((const char *)(d + n * groups), _MM_HINT_T0);
    if (mn) _mm_prefetch((const char *)(mn + n * groups), _MM_HINT_T0);
}
#endif

/* y (M, N) = x (M, K) @ W^T; returns 0, or -1 for sizes it does not handle (K % 32 != 0). */
int kvtier_qmatmul(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                   const uint16_t *mn, int64_t N, int bits, float *y, int threads) {
    if (K % 32 != 0 || K > 16384 || (bits != 4 && bits != 8)) return -1;
    int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / 32;
#ifdef KVT_AVX2
    if (M == 1) {
        float xsum[16384 / 32];
        for (int64_t g = 0; g < groups; g++) {
            float t = 0.0f;
            for (int j = 0; j < 32; j++) t += x[32 * g + j];
            xsum[g] = t;
        }
        enum { AHEAD = 4 };  /* rows prefetched ahead (prefetch_row) */
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) {
            if (n + AHEAD < N) prefetch_row(codes, d, mn, row_bytes, groups, n + AHEAD);
            y[n] = DOT_PACKED(codes + n * row_bytes, d + n * groups, mn ? mn + n * groups : 0, x, xsum, K,
                              bits);
        }
        return 0;
    }
#endif
    #pragma omp parallel num_threads(threads)
    {
        float w[16384] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            dequant_row(codes + n * row_bytes, d + n * groups, mn ? mn + n * groups : 0, K, bits, w);
            dot_rows(w, x, M, K, N, y + n);
        }
    }
    return 0;
}

/* W (N, K) dequantized to fp32 (for long prefill chunks, where a blocked sgemm wins). */
int kvtier_qdequant(const uint8_t *codes, const uint16_t *d, const uint16_t *mn, int64_t N, int64_t K,
                    int bits, float *out, int threads) {
    if (K % 32 != 0 || (bits != 4 && bits != 8)) return -1;
    int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        dequant_row(codes + n * row_bytes, d + n * groups, mn ? mn + n * groups : 0, K, bits, out + n * K);
    return 0;
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
/* One row of W as bf16, a group of 32 a register: dequant_row's fp32 values, rounded, with
 * 16-lane conversions (dequant_row's are 8-lane). */
static inline void dequant_bf16(const uint8_t *c, const uint16_t *d, const uint16_t *mn, int64_t groups, int bits,
                                __m512bh *out) {
    for (int64_t g = 0; g < groups; g++) {
        const __m512 vs = _mm512_set1_ps(half_to_float(d[g]));
        __m512 w0, w1;
        if (bits == 4) {
            const __m512 vm = _mm512_set1_ps(mn ? half_to_float(mn[g]) : 0.0f);
            const __m128i q = _mm_loadu_si128((const __m128i *)(c + 16 * g));
            w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, _mm_set1_epi8(15)))), vs, vm);
            w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                     _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(15)))), vs, vm);
        } else {
            const int8_t *q = (const int8_t *)c + 32 * g;
            w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), vs);
            w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), vs);
        }
        _mm512_storeu_si512(out + g, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
    }
}

/* Several rows of bf16 x on a CPU with bf16 dot products (vdpbf16ps: 32 multiply-adds an
 * instruction): each weight row is dequantized once, rounded to bf16 (the values a dense bf16
 * weight holds) and dotted with every row of x, four at a time. */
static void rows_bf16(const uint16_t *x16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                      const uint16_t *mn, int64_t N, int bits, float *y, int threads) {
    int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / 32;
    #pragma omp parallel num_threads(threads)
    {
        __m512bh wb[16384 / 32];
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            dequant_bf16(codes + n * row_bytes, d + n * groups, mn ? mn + n * groups : 0, groups, bits, wb);
            int64_t m = 0;
            for (; m + 4 <= M; m += 4) {
                const uint16_t *x0 = x16 + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t g = 0; g < groups; g++) {
                    a0 = _mm512_dpbf16_ps(a0, wb[g], (__m512bh)_mm512_loadu_si512(x0 + 32 * g));
                    a1 = _mm512_dpbf16_ps(a1, wb[g], (__m512bh)_mm512_loadu_si512(x1 + 32 * g));
                    a2 = _mm512_dpbf16_ps(a2, wb[g], (__m512bh)_mm512_loadu_si512(x2 + 32 * g));
                    a3 = _mm512_dpbf16_ps(a3, wb[g], (__m512bh)_mm512_loadu_si512(x3 + 32 * g));
                }
                y[(m + 0) * N + n] = _mm512_reduce_add_ps(a0);
                y[(m + 1) * N + n] = _mm512_reduce_add_ps(a1);
                y[(m + 2) * N + n] = _mm512_reduce_add_ps(a2);
                y[(m + 3) * N + n] = _mm512_reduce_add_ps(a3);
            }
            for (; m < M; m++) {
                __m512 a = _mm512_setzero_ps();
                for (int64_t g = 0; g < groups; g++)
                    a = _mm512_dpbf16_ps(a, wb[g], (__m512bh)_mm512_loadu_si512(x16 + m * K + 32 * g));
                y[m * N + n] = _mm512_reduce_add_ps(a);
            }
        }
    }
}
#endif

#ifdef KVT_AMX
/* Up to 16 rows of bf16 x on AMX tiles (Intel's matrix units): y^T = W x^T, 16 output columns
 * (rows of W) at a time. The A tile is 16 rows of W dequantized to bf16 over one group of 32
 * (dequant_bf16, the values rows_bf16 multiplies), in their own row-major layout; the B tile is
 * x's 32 values of that group for each of its rows, in AMX's pair-interleaved layout (built once
 * per call: row p holds, for each row m of x, the pair x[m][2p], x[m][2p + 1]); the C tile
 * accumulates the 16 x 16 fp32 dot products over K. Same products and fp32 sums as rows_bf16 in
 * another order: 2.2x its speed for 16 rows here, where vdpbf16ps (half an instruction a cycle) is the limit. */
static int rows_amx(const uint16_t *x16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                    const uint16_t *mn, int64_t N, int bits, float *y, int threads) {
    if (M > 16 || !amx_permitted()) return -1;
    const int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / 32, blocks = (N + 15) / 16;
    uint32_t *xb = aligned_alloc(64, (size_t)groups * 16 * 16 * 4);  /* B tiles: (groups, 16 pairs, 16 rows of x) */
    if (!xb) return -1;
    const uint32_t *xd = (const uint32_t *)x16;  /* x as bf16 pairs: (M, K / 2) */
    for (int64_t g = 0; g < groups; g++)
        for (int p = 0; p < 16; p++)
            for (int m = 0; m < 16; m++)
                xb[(g * 16 + p) * 16 + m] = m < M ? xd[m * (K / 2) + 16 * g + p] : 0;
    #pragma omp parallel num_threads(threads)
    {
        TileConfig saved;
        amx_begin(&saved, 3, NULL);  /* 0: C, 1: A (W), 2: B (x) */
        __m512bh wa[16] __attribute__((aligned(64)));  /* the A tile: 16 rows of W, one group */
        float c[16][16] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = 16 * b, rows = N - n0 < 16 ? N - n0 : 16;
            for (int64_t n = n0 + 16; n < n0 + 32 && n < N; n++) {  /* the next block's rows, from memory */
                const char *next = (const char *)(codes + n * row_bytes);
                for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(next + o, _MM_HINT_T0);
                _mm_prefetch((const char *)(d + n * groups), _MM_HINT_T0);
                if (mn) _mm_prefetch((const char *)(mn + n * groups), _MM_HINT_T0);
            }
            _tile_zero(0);
            for (int64_t g = 0; g < groups; g++) {
                for (int64_t r = 0; r < 16; r++) {
                    if (r < rows) {
                        const int64_t n = n0 + r;
                        dequant_bf16(codes + n * row_bytes + g * (bits == 4 ? 16 : 32), d + n * groups + g,
                                     mn ? mn + n * groups + g : 0, 1, bits, wa + r);
                    } else {
                        wa[r] = (__m512bh)_mm512_setzero_si512();
                    }
                }
                _tile_loadd(1, wa, 64);
                _tile_loadd(2, xb + g * 256, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, c, 64);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t m = 0; m < M; m++) y[m * N + n0 + r] = c[r][m];
        }
        amx_end(&saved);
    }
    free(xb);
    return 0;
}
#endif

/* W (N, K) dequantized to bf16 (the rounding rows_bf16 applies), for a long bf16 prefill chunk:
 * half the bytes of the fp32 matrix and no second pass to convert it. */
int kvtier_qdequant_bf16(const uint8_t *codes, const uint16_t *d, const uint16_t *mn, int64_t N, int64_t K,
                         int bits, uint16_t *out, int threads) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (K % 32 != 0 || (bits != 4 && bits != 8)) return -1;
    int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        dequant_bf16(codes + n * row_bytes, d + n * groups, mn ? mn + n * groups : 0, groups, bits,
                     (__m512bh *)(out + n * K));
    return 0;
#else
    (void)codes; (void)d; (void)mn; (void)N; (void)K; (void)bits; (void)out; (void)threads;
    return -1;
#endif
}

/* y (n fp32 values) rounded to bf16, to nearest even (16 at a time where the CPU converts) */
static void to_bf16(const float *y, int64_t n, uint16_t *y16) {
    int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y16 + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(y + i)));
#endif
    for (; i < n; i++) {
        uint32_t u;
        memcpy(&u, y + i, 4);
        y16[i] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(KVT_AVX2)
/* One row of bf16 x (a single decoding sequence) times 4-bit W, two groups (64 weights) an
 * iteration on bf16 dot products: each code becomes the bf16 integer 0..15 it is (a 16-entry
 * lookup), so every product is exact in fp32, as in dot_packed, and each group's scale multiplies
 * its partial sums once. x is reordered once per call into the order the codes unpack to: two
 * groups' low nibbles (their first 16 weights), then their high nibbles. The minimum's share,
 * m * sum(x over the group), is 16 groups a vector. An odd last group is dotted in fp32. Against
 * dot_packed512 (codes widened to fp32 lanes): 2.2x the speed on SmolLM2's q4 matrices. */
static void row_bf16_q4(const uint16_t *x16, int64_t K, const uint8_t *codes, const uint16_t *d,
                        const uint16_t *mn, int64_t N, float *y, int threads) {
    const int64_t groups = K / 32, pairs = groups / 2, row_bytes = K / 2;
    uint16_t xr[16384] __attribute__((aligned(64)));
    float xsum[16384 / 32 + 16] = {0}, xt[32];  /* xsum padded to whole vectors with zeros */
    for (int64_t p = 0; p < pairs; p++) {
        const uint16_t *a = x16 + 64 * p, *b = a + 32;
        memcpy(xr + 64 * p, a, 32);
        memcpy(xr + 64 * p + 16, b, 32);
        memcpy(xr + 64 * p + 32, a + 16, 32);
        memcpy(xr + 64 * p + 48, b + 16, 32);
    }
    for (int64_t g = 0; g < groups; g++) {
        float t = 0.0f;
        for (int j = 0; j < 32; j++) {
            uint32_t u = (uint32_t)x16[32 * g + j] << 16;
            float f;
            memcpy(&f, &u, 4);
            t += f;
            if (g == 2 * pairs) xt[j] = f;
        }
        xsum[g] = t;
    }
    const __m512 ramp = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(ramp, ramp);  /* word k < 16: bf16(k) */
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m256i low = _mm256_set1_epi8(15);
    enum { AHEAD = 4 };  /* rows prefetched ahead, as in kvtier_qmatmul */
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        if (n + AHEAD < N) prefetch_row(codes, d, mn, row_bytes, groups, n + AHEAD);
        const uint8_t *c = codes + n * row_bytes;
        const uint16_t *dn = d + n * groups;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
        for (int64_t p = 0; p < pairs; p++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(c + 32 * p));
            const __m512i wl = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_and_si256(q, low)), table);
            const __m512i wh = _mm512_permutexvar_epi16(
                _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), low)), table);
            __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl, (__m512bh)_mm512_load_si512(xr + 64 * p));
            t = _mm512_dpbf16_ps(t, (__m512bh)wh, (__m512bh)_mm512_load_si512(xr + 64 * p + 32));
            int32_t two;
            memcpy(&two, dn + 2 * p, 4);
            const __m512 vd = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two))));
            if (p & 1) acc1 = _mm512_fmadd_ps(t, vd, acc1);
            else acc0 = _mm512_fmadd_ps(t, vd, acc0);
        }
        if (mn)
            for (int64_t g = 0; g < groups; g += 16) {
                const __mmask16 k = groups - g >= 16 ? 0xffff : (__mmask16)((1u << (groups - g)) - 1);
                const __m512 vm = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + n * groups + g));
                acc1 = _mm512_fmadd_ps(vm, _mm512_loadu_ps(xsum + g), acc1);
            }
        float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        if (groups & 1) {
            const uint8_t *ct = c + 16 * (groups - 1);
            float sub = 0.0f;
            for (int j = 0; j < 16; j++) sub += (float)(ct[j] & 15) * xt[j] + (float)(ct[j] >> 4) * xt[j + 16];
            s += half_to_float(dn[groups - 1]) * sub;
        }
        y[n] = s;
    }
}
#endif

/* kvtier_qmatmul with bf16 x and y (the compute dtype on CPUs with native bf16): the
 * conversions happen here, not as two more tensor ops per matmul. */
int kvtier_qmatmul_bf16(const uint16_t *x16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                        const uint16_t *mn, int64_t N, int bits, uint16_t *y16, int threads) {
    if (K % 32 != 0 || K > 16384 || (bits != 4 && bits != 8)) return -1;
    float *x = malloc(sizeof(float) * (size_t)(M * K + M * N));
    if (!x) return -1;
    float *y = x + M * K;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    int done = -1;
#ifdef KVT_AMX
    if (M > 1)  /* one row: dot_packed's one pass is faster */
        for (int64_t m0 = 0; m0 < M; m0 += 16) {  /* 16 rows of x a pass */
            done = rows_amx(x16 + m0 * K, M - m0 < 16 ? M - m0 : 16, K, codes, d, mn, N, bits, y + m0 * N, threads);
            if (done != 0) break;
        }
#endif
    if (done != 0 && M > 1) {
        rows_bf16(x16, M, K, codes, d, mn, N, bits, y, threads);
        done = 0;
    }
#if defined(__AVX512BW__) && defined(KVT_AVX2)
    if (done != 0 && M == 1 && bits == 4) {
        row_bf16_q4(x16, K, codes, d, mn, N, y, threads);
        done = 0;
    }
#endif
    if (done == 0) {
        to_bf16(y, M * N, y16);
        free(x);
        return 0;
    }
#endif
    for (int64_t i = 0; i < M * K; i++) {
        uint32_t u = (uint32_t)x16[i] << 16;
        memcpy(x + i, &u, 4);
    }
    int rc = kvtier_qmatmul(x, M, K, codes, d, mn, N, bits, y, threads);
    if (rc == 0) to_bf16(y, M * N, y16);
    free(x);
    return rc;
}
