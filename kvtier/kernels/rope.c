/* Rotary embedding (rotate-half layout) in one pass: y = x * cos + rotate_half(x) * sin, with
 * rotate_half(x) = (-x[D/2:], x[:D/2]), rounded as kvtier.models.base.Rope's PyTorch ops round
 * (each product, then the sum: bf16 after each in a bf16 model), so the outputs are the same
 * numbers (tests/test_pointwise.py). Compiled without fast-math and without contracting the
 * products into the sum (an FMA would round once instead of three times). */
#pragma GCC optimize("no-fast-math", "fp-contract=off")
#include <stdint.h>

#include "bf16.h"

static inline float r16(float f) { return bf16_to_float(float_to_bf16(f)); }

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

static inline __m512 load16(const uint16_t *p, __mmask16 k) { /* bf16 -> fp32, exact */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

static inline __m512 round16(__m512 v) { /* to bf16 and back: round to nearest even, as r16 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
#endif

/* x (N, H, D) with row stride ldx and head stride D (elements); cos, sin rows of D at row stride
 * ldc; out (N, H, D) contiguous. bf16 or fp32 throughout. */
int kvtier_rope(const void *x, int64_t ldx, int64_t N, int64_t H, int64_t D, const void *cos, const void *sin,
                int64_t ldc, int bf16, void *out, int threads) {
    if (N < 0 || H < 1 || D < 2 || D % 2) return -1;
    const int64_t half = D / 2;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (bf16) { /* 16 lanes at a time: the same products, roundings and sums */
        #pragma omp parallel for schedule(static) num_threads(threads) if (N * H * D >= 65536)
        for (int64_t n = 0; n < N; n++) {
            const uint16_t *cs = (const uint16_t *)cos + n * ldc, *sn = (const uint16_t *)sin + n * ldc;
            for (int64_t h = 0; h < H; h++) {
                const uint16_t *xs = (const uint16_t *)x + n * ldx + h * D;
                uint16_t *o = (uint16_t *)out + (n * H + h) * D;
                for (int64_t c = 0; c < half; c += 16) {
                    const __mmask16 k = half - c >= 16 ? 0xffff : (__mmask16)((1u << (half - c)) - 1);
                    const __m512 x1 = load16(xs + c, k), x2 = load16(xs + half + c, k);
                    /* first half: x1 cos - x2 sin; second half: x2 cos + x1 sin */
                    const __m512 a1 = round16(_mm512_mul_ps(x1, load16(cs + c, k))),
                                 b1 = round16(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_xor_si512(  /* -x2, -0 included */
                                                    _mm512_castps_si512(x2), _mm512_set1_epi32((int)0x80000000u))), load16(sn + c, k)));
                    const __m512 a2 = round16(_mm512_mul_ps(x2, load16(cs + half + c, k))),
                                 b2 = round16(_mm512_mul_ps(x1, load16(sn + half + c, k)));
                    _mm256_mask_storeu_epi16(o + c, k, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(a1, b1)));
                    _mm256_mask_storeu_epi16(o + half + c, k, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(a2, b2)));
                }
            }
        }
        return 0;
    }
#endif
    #pragma omp parallel for schedule(static) num_threads(threads) if (N * H * D >= 65536)
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t c = 0; c < D; c++) {
                const int64_t i = n * ldx + h * D + c, o = (n * H + h) * D + c;
                const int64_t j = c < half ? i + half : i - half;  /* the element rotate_half moves here */
                if (bf16) {
                    const uint16_t *xs = x;
                    const float rot = c < half ? -bf16_to_float(xs[j]) : bf16_to_float(xs[j]);
                    const float a = r16(bf16_to_float(xs[i]) * bf16_to_float(((const uint16_t *)cos)[n * ldc + c]));
                    const float b = r16(rot * bf16_to_float(((const uint16_t *)sin)[n * ldc + c]));
                    ((uint16_t *)out)[o] = float_to_bf16(a + b);
                } else {
                    const float *xs = x;
                    const float rot = c < half ? -xs[j] : xs[j];
                    const float a = xs[i] * ((const float *)cos)[n * ldc + c];
                    const float b = rot * ((const float *)sin)[n * ldc + c];
                    ((float *)out)[o] = a + b;
                }
            }
    return 0;
}
