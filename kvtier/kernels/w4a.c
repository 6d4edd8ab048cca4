/* y = x W^T with 4-bit weights and integer activations (--weights w4a4 / w4a8, kvtier.weights.w4a).
 *
 * W (N, K) holds --weights q4's numbers (GGUF Q4_1, kvtier.weights.quant): groups of 32 inputs,
 * W[n, 32g + j] = d[n, g] * u + m[n, g], u in 0..15, d, m fp16. The nibbles are reordered one
 * weight row per 32-bit lane (kvtier.weights.w4a._lanes): per block of 16 rows and group g, 4
 * vectors of 64 bytes, byte 4 n + j of vector v holding u[n][32 g + 8 v + j] in its low nibble
 * and u[n][32 g + 8 v + 4 + j] in its high one; d, m as (blocks, G, 16).
 *
 * A call quantizes each row of x per group of 32 inputs, as llama.cpp's Q8_1 does:
 *   xs[k] = x[k] * keep[k] (keep is 0 at the matrix's outlier input channels, 1 elsewhere),
 *   r = qmax / max|xs over the group| (1 for an all-zero group), q = round_half_even(xs * r),
 *   sx = 1 / r, qsum = sum of the group's q;
 * with qmax 7 (4-bit activations) or 127 (8-bit). Then, exactly in int32 (vpdpbusd: the
 * unsigned nibbles against the signed q), dot = sum u q over each group, and
 *   y[n] = sum_g sx_g * (d[n,g] * dot_g + m[n,g] * qsum_g) + sum_o x[o] * wout[o][n] + bias[n],
 * the outlier channels o multiplied in fp32 against their own dequantized weight columns
 * (wout, (n_out, N)). The PyTorch oracle is kvtier.weights.w4a.W4ALinear.reference; the int32
 * sums are exact, the float sums come in another order, so tests compare within fp32 rounding.
 * Without AVX512-VNNI the entry point returns -1 and the caller takes the reference. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

#define TILE 64 /* rows of x quantized and kept in L1/L2 while the weights stream past them */

/* Rows m0 .. m0 + mt - 1 of y from their integer parts acc (row stride lda): the outlier
 * channels in fp32 against their dequantized columns, the bias, the output dtype. */
static void finish_rows(const void *x, int x_bf16, int64_t m0, int64_t mt, size_t xrow, float *acc, int64_t lda,
                        int64_t N, int64_t n_out, const int32_t *out_idx, const float *wout, const float *bias, void *y,
                        int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < mt; r++) {
        float *ar = acc + r * lda;
        const char *xr = (const char *)x + (m0 + r) * xrow;
        for (int64_t o = 0; o < n_out; o++) {
            const int64_t k = out_idx[o];
            const __m512 xb = _mm512_set1_ps(x_bf16 ? bf16_to_float(((const uint16_t *)xr)[k]) : ((const float *)xr)[k]);
            const float *wo = wout + o * N;
            for (int64_t n = 0; n < N; n += 16) {
                const __mmask16 in = N - n >= 16 ? 0xffff : (__mmask16)((1u << (N - n)) - 1);
                _mm512_mask_storeu_ps(ar + n, in, _mm512_fmadd_ps(xb, _mm512_maskz_loadu_ps(in, wo + n),
                                                                  _mm512_maskz_loadu_ps(in, ar + n)));
            }
        }
        for (int64_t n = 0; n < N; n += 16) {
            const __mmask16 in = N - n >= 16 ? 0xffff : (__mmask16)((1u << (N - n)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(in, ar + n);
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(in, bias + n));
            const int64_t at = (m0 + r) * N + n;
            if (in == 0xffff) {
                store16_from_float(y, at, v, x_bf16);
            } else { /* the last columns, one at a time */
                float tail[16];
                _mm512_storeu_ps(tail, v);
                for (int64_t j = 0; j < N - n; j++)
                    if (x_bf16) ((uint16_t *)y)[at + j] = float_to_bf16(tail[j]);
                    else ((float *)y)[at + j] = tail[j];
            }
        }
    }
}

/* R rows of x (quantized) against one block of 16 weight rows: 16 sums per row of x, in acc.
 * A group is 8 vpdpbusd for the block's 16 rows, its scales one multiply-add per 16 rows; the
 * rows of x share each unpacked group, and no sum runs across lanes. */
static inline void block_rows(const int R, const uint8_t *wb, const uint16_t *db, const uint16_t *mb, int64_t G,
                              const int8_t *q, const float *sx, const float *c, int64_t K, __m512 *acc) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i lo[4], hi[4];
        for (int v = 0; v < 4; v++) {
            const __m512i w = _mm512_loadu_si512(wb + 256 * g + 64 * v);
            lo[v] = _mm512_and_si512(w, nib);
            hi[v] = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(db + 16 * g)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mb + 16 * g)));
        for (int r = 0; r < R; r++) {
            int32_t quad[8];
            memcpy(quad, q + r * K + 32 * g, 32);
            __m512i s = _mm512_setzero_si512();
            for (int v = 0; v < 4; v++) {
                s = _mm512_dpbusd_epi32(s, lo[v], _mm512_set1_epi32(quad[2 * v]));
                s = _mm512_dpbusd_epi32(s, hi[v], _mm512_set1_epi32(quad[2 * v + 1]));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_set1_ps(sx[r * G + g])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(c[r * G + g]), acc[r]);
        }
    }
}

/* Row x quantized in the inputs' own order: q (K), sx and sx * qsum (G each) */
static void quantize_row(const void *x, int bf16, int64_t K, const float *keep, float qmax, int8_t *q, float *sx,
                           float *c) {
    for (int64_t g = 0; g < K / 32; g++) {
        __m512 v[2];
        for (int h = 0; h < 2; h++)
            v[h] = _mm512_mul_ps(load16_as_float(x, 32 * g + 16 * h, bf16), _mm512_loadu_ps(keep + 32 * g + 16 * h));
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float r = amax > 0.0f ? qmax / amax : 1.0f;
        int32_t sum = 0;
        for (int h = 0; h < 2; h++) {
            const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], _mm512_set1_ps(r)));
            sum += _mm512_reduce_add_epi32(qi);
            _mm_storeu_si128((__m128i *)(q + 32 * g + 16 * h), _mm512_cvtsepi32_epi8(qi));
        }
        sx[g] = 1.0f / r;
        c[g] = sx[g] * (float)sum;
    }
}

int kvtier_w4a_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *packed, const uint16_t *d,
                      const uint16_t *mm, int64_t N, float qmax, const float *keep, int64_t n_out,
                      const int32_t *out_idx, const float *wout, const float *bias, void *y, int threads) {
    if (K % 32 || K < 32 || M < 1 || N < 1) return -1;
    const int64_t G = K / 32, blocks = (N + 15) / 16, tile = M < TILE ? M : TILE, np = blocks * 16;
    int8_t *q = malloc((size_t)(tile * K));
    float *sx = malloc(sizeof(float) * (size_t)(tile * G)), *c = malloc(sizeof(float) * (size_t)(tile * G));
    float *acc = malloc(sizeof(float) * (size_t)(tile * np));
    if (!q || !sx || !c || !acc) {
        free(q); free(sx); free(c); free(acc);
        return -1;
    }
    const size_t xrow = (size_t)K * (x_bf16 ? 2 : 4);
    for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int64_t mt = M - m0 < tile ? M - m0 : tile;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < mt; r++)
            quantize_row((const char *)x + (m0 + r) * xrow, x_bf16, K, keep, qmax, q + r * K, sx + r * G, c + r * G);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *wb = packed + b * G * 256;
            const uint16_t *db = d + b * G * 16, *mb = mm + b * G * 16;
            __m512 part[4];
            int64_t r = 0;
            for (; r + 4 <= mt; r += 4) {
                block_rows(4, wb, db, mb, G, q + r * K, sx + r * G, c + r * G, K, part);
                for (int j = 0; j < 4; j++) _mm512_storeu_ps(acc + (r + j) * np + 16 * b, part[j]);
            }
            for (; r < mt; r++) {
                block_rows(1, wb, db, mb, G, q + r * K, sx + r * G, c + r * G, K, part);
                _mm512_storeu_ps(acc + r * np + 16 * b, part[0]);
            }
        }
        finish_rows(x, x_bf16, m0, mt, xrow, acc, np, N, n_out, out_idx, wout, bias, y, threads);
    }
    free(q); free(sx); free(c); free(acc);
    return 0;
}

#else

int kvtier_w4a_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *packed, const uint16_t *d,
                      const uint16_t *mm, int64_t N, float qmax, const float *keep, int64_t n_out, const int32_t *out_idx,
                      const float *wout, const float *bias, void *y, int threads) {
    (void)x; (void)x_bf16; (void)M; (void)K; (void)packed; (void)d; (void)mm; (void)N; (void)qmax; (void)keep;
    (void)n_out; (void)out_idx; (void)wout; (void)bias; (void)y; (void)threads;
    return -1;
}

#endif
