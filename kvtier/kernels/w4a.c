/* y = x W^T with 4-bit weights and integer activations (--weights w4a4 / w4a8, kvtier.weights.w4a).
 *
 * W (N, K) is held exactly as --weights q4 holds it (GGUF Q4_1, kvtier.weights.quant): groups of
 * 32 inputs, W[n, 32g + j] = d[n, g] * u + m[n, g], u in 0..15, codes[n, 16g + j] holding u of
 * input j in its low nibble and of input j + 16 in its high nibble; d, m fp16.
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

#define TILE 64 /* rows of x quantized and kept in L2 while the weights stream past them */

/* Row x (K inputs) quantized for 4-group chunks: qlo / qhi (G4 * 64 bytes: the q of inputs
 * 0..15 / 16..31 of each group, in the codes' order), sxr (G4 * 16: each group's sx on its
 * four lanes) and c (G16 floats: sx * qsum per group, zero past G). */
static void quantize_row(const void *x, int bf16, int64_t K, const float *keep, float qmax, int64_t G4,
                         int64_t G16, int8_t *qlo, int8_t *qhi, float *sxr, float *c) {
    const int64_t G = K / 32;
    memset(qlo, 0, (size_t)(G4 * 64));
    memset(qhi, 0, (size_t)(G4 * 64));
    memset(sxr, 0, sizeof(float) * (size_t)(G4 * 16));
    memset(c, 0, sizeof(float) * (size_t)G16);
    for (int64_t g = 0; g < G; g++) {
        __m512 v[2];
        for (int h = 0; h < 2; h++) {
            const int64_t k = 32 * g + 16 * h;
            v[h] = _mm512_mul_ps(load16_as_float(x, k, bf16), _mm512_loadu_ps(keep + k));
        }
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float r = amax > 0.0f ? qmax / amax : 1.0f;
        const __m512 vr = _mm512_set1_ps(r);
        int32_t sum = 0;
        for (int h = 0; h < 2; h++) {
            __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], vr)); /* nearest even; |q| <= qmax */
            sum += _mm512_reduce_add_epi32(qi);
            _mm_storeu_si128((__m128i *)((h ? qhi : qlo) + 64 * (g / 4) + 16 * (g % 4)), _mm512_cvtsepi32_epi8(qi));
        }
        const float sx = 1.0f / r;
        for (int l = 0; l < 4; l++) sxr[16 * (g / 4) + 4 * (g % 4) + l] = sx;
        c[g] = sx * (float)sum;
    }
}

/* R rows of x against weight row n: R outputs (before the outliers and the bias) */
static inline void rows_dot(const int R, const uint8_t *codes, const uint16_t *d, const uint16_t *mm, int64_t G,
                            int64_t G4, int64_t G16, const int8_t *qlo, const int8_t *qhi, const float *sxr,
                            const float *c, int64_t stride_q, int64_t stride_s, int64_t stride_c, float *out) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const __m512i rep = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[4], macc[4];
    for (int r = 0; r < R; r++) acc[r] = macc[r] = _mm512_setzero_ps();
    for (int64_t ch = 0; ch < G4; ch++) {
        const int64_t left = G - 4 * ch;
        const __mmask64 in = left >= 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * left)) - 1);
        const __m512i w = _mm512_maskz_loadu_epi8(in, codes + 64 * ch);
        const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
        const __m128i dh = _mm_maskz_loadu_epi16(left >= 4 ? 0xf : (__mmask8)((1u << left) - 1), d + 4 * ch);
        const __m512 dv = _mm512_permutexvar_ps(rep, _mm512_castps128_ps512(_mm_cvtph_ps(dh)));
        for (int r = 0; r < R; r++) {
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(qlo + r * stride_q + 64 * ch));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(qhi + r * stride_q + 64 * ch));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_loadu_ps(sxr + r * stride_s + 16 * ch)),
                                     acc[r]);
        }
    }
    for (int64_t g = 0; g < G16; g += 16) {
        const __mmask16 in = G - g >= 16 ? 0xffff : (__mmask16)((1u << (G - g)) - 1);
        const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, mm + g));
        for (int r = 0; r < R; r++) macc[r] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(c + r * stride_c + g), macc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(macc[r]);
}

int kvtier_w4a_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                      const uint16_t *mm, int64_t N, float qmax, const float *keep, int64_t n_out, const int32_t *out_idx,
                      const float *wout, const float *bias, void *y, int threads) {
    if (K % 32 || K < 32 || M < 1 || N < 1) return -1;
    const int64_t G = K / 32, G4 = (G + 3) / 4, G16 = (G + 15) / 16 * 16;
    const int64_t sq = G4 * 64, ss = G4 * 16, tile = M < TILE ? M : TILE;
    int8_t *qlo = malloc((size_t)(tile * sq)), *qhi = malloc((size_t)(tile * sq));
    float *sxr = malloc(sizeof(float) * (size_t)(tile * ss)), *c = malloc(sizeof(float) * (size_t)(tile * G16));
    float *acc = malloc(sizeof(float) * (size_t)(tile * N));
    if (!qlo || !qhi || !sxr || !c || !acc) {
        free(qlo); free(qhi); free(sxr); free(c); free(acc);
        return -1;
    }
    const size_t xrow = (size_t)K * (x_bf16 ? 2 : 4);
    for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int64_t mt = M - m0 < tile ? M - m0 : tile;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < mt; r++)
            quantize_row((const char *)x + (m0 + r) * xrow, x_bf16, K, keep, qmax, G4, G16, qlo + r * sq, qhi + r * sq,
                         sxr + r * ss, c + r * G16);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *cn = codes + n * (K / 2);
            const uint16_t *dn = d + n * G, *mn = mm + n * G;
            float part[4];
            int64_t r = 0;
            for (; r + 4 <= mt; r += 4) {
                rows_dot(4, cn, dn, mn, G, G4, G16, qlo + r * sq, qhi + r * sq, sxr + r * ss, c + r * G16, sq, ss, G16, part);
                for (int j = 0; j < 4; j++) acc[(r + j) * N + n] = part[j];
            }
            for (; r < mt; r++) {
                rows_dot(1, cn, dn, mn, G, G4, G16, qlo + r * sq, qhi + r * sq, sxr + r * ss, c + r * G16, sq, ss, G16, part);
                acc[r * N + n] = part[0];
            }
        }
        /* the outlier channels in fp32 against their dequantized columns, the bias, the output dtype */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < mt; r++) {
            float *ar = acc + r * N;
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
    free(qlo); free(qhi); free(sxr); free(c); free(acc);
    return 0;
}

#else

int kvtier_w4a_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                      const uint16_t *mm, int64_t N, float qmax, const float *keep, int64_t n_out, const int32_t *out_idx,
                      const float *wout, const float *bias, void *y, int threads) {
    (void)x; (void)x_bf16; (void)M; (void)K; (void)codes; (void)d; (void)mm; (void)N; (void)qmax; (void)keep;
    (void)n_out; (void)out_idx; (void)wout; (void)bias; (void)y; (void)threads;
    return -1;
}

#endif
