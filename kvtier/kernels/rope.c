/* Rotary embedding (rotate-half layout) in one pass: y = x * cos + rotate_half(x) * sin, with
 * rotate_half(x) = (-x[D/2:], x[:D/2]), rounded as kvtier.models.base.Rope's PyTorch ops round
 * (each product, then the sum: bf16 after each in a bf16 model), so the outputs are the same
 * numbers (tests/test_pointwise.py). Compiled without fast-math and without contracting the
 * products into the sum (an FMA would round once instead of three times). */
#pragma GCC optimize("no-fast-math", "fp-contract=off")
#include <stdint.h>

#include "bf16.h"

static inline float r16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* x (N, H, D) with row stride ldx and head stride D (elements); cos, sin rows of D at row stride
 * ldc; out (N, H, D) contiguous. bf16 or fp32 throughout. */
int kvtier_rope(const void *x, int64_t ldx, int64_t N, int64_t H, int64_t D, const void *cos, const void *sin,
                int64_t ldc, int bf16, void *out, int threads) {
    if (N < 0 || H < 1 || D < 2 || D % 2) return -1;
    const int64_t half = D / 2;
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
