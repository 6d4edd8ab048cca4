/* The element-wise layers of a decoder, each in one pass over its rows: RMSNorm (with the
 * residual add before it fused in) and SwiGLU's silu(gate) * up. The PyTorch references beside
 * them are kvtier.models.base.rms_norm_reference (after torch's add) and `F.silu(gate) * up`
 * (kvtier.models.llama.Llama.gated); tests/test_pointwise.py checks they agree.
 *
 * Rows of C elements in bf16 or fp32 (in and out in one dtype), the arithmetic in fp32 as the
 * references do it: torch's bf16 ops also compute in fp32 and round once per op, so the bf16
 * outputs differ from the references' only where the references round an intermediate. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "vexp.h"

static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

#ifdef __AVX512F__
#ifdef __AVX512BF16__
static inline __m512 round_bf16(__m512 x) {  /* to nearest even, as float_to_bf16 */
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

/* 16 lanes of silu(g) * u: e = e^-|g| (exp512 takes x <= 0), so silu(g) = g / (1 + e) for
 * g >= 0 and g e / (1 + e) below */
static inline __m512 silu_mul16(__m512 g, __m512 u, int bf16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    /* 1 / (1 + e) for 1 + e in [1, 2]: rcp14 and one Newton step (within an fp32 ulp or two,
     * then rounded to bf16), a third of a division's time */
    const __m512 d = _mm512_add_ps(e, _mm512_set1_ps(1.0f)), r0 = _mm512_rcp14_ps(d);
    const __m512 r = _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.0f)));
    __m512 s = _mm512_mul_ps(_mm512_mask_mul_ps(g, neg, g, e), r);
#ifdef __AVX512BF16__
    if (bf16) s = round_bf16(s);  /* torch rounds silu's output first */
#else
    (void)bf16;
#endif
    return _mm512_mul_ps(s, u);
}
#endif

/* s[n] = x[n] + delta[n] (rounded to the dtype, as torch's add rounds) when delta is given, else
 * s = x; y[n] = s[n] * rsqrt(mean(s[n]^2) + eps) * (w + offset). x, delta, sum, y (N, C) with
 * row strides ldx, ldd, lds, ldy (elements); w (C,) fp32; sum is written only with delta. The
 * residual stream's add and the next RMSNorm in one pass over the rows. */
int kvtier_rms_norm(const void *x, int64_t ldx, const void *delta, int64_t ldd, void *sum, int64_t lds, int64_t N,
                    int64_t C, const float *w, float eps, float offset, int bf16, void *y, int64_t ldy, int threads) {
    if (N < 0 || C < 1 || C > 16384 || (delta && !sum)) return -1;  /* a row on the stack */
    #pragma omp parallel for schedule(static) num_threads(threads) if (N * C >= 32768)
    for (int64_t n = 0; n < N; n++) {
        float row[C];
        float ss = 0.f;
        int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        __m512 acc = _mm512_setzero_ps();
        for (; c + 16 <= C; c += 16) {
            __m512 v = load16_as_float(x, n * ldx + c, bf16);
            if (delta) {
                v = _mm512_add_ps(v, load16_as_float(delta, n * ldd + c, bf16));
                if (bf16) { /* rounded once, stored, and kept as rounded */
                    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
                    _mm256_storeu_si256((__m256i *)((uint16_t *)sum + n * lds + c), h);
                    v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                } else {
                    _mm512_storeu_ps((float *)sum + n * lds + c, v);
                }
            }
            _mm512_storeu_ps(row + c, v);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#endif
        for (; c < C; c++) {
            float v = load(x, n * ldx + c, bf16);
            if (delta) {
                v += load(delta, n * ldd + c, bf16);
                if (bf16) v = bf16_to_float(float_to_bf16(v));
                store(sum, n * lds + c, v, bf16);
            }
            row[c] = v;
            ss += v * v;
        }
        const float r = 1.0f / sqrtf(ss / (float)C + eps);
        c = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        const __m512 vr = _mm512_set1_ps(r), voff = _mm512_set1_ps(offset);
        for (; c + 16 <= C; c += 16)
            store16_from_float(y, n * ldy + c, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(row + c), vr),
                                                             _mm512_add_ps(_mm512_loadu_ps(w + c), voff)), bf16);
#endif
        for (; c < C; c++) store(y, n * ldy + c, row[c] * r * (w[c] + offset), bf16);
    }
    return 0;
}

/* out (N, F) = silu(gu[:, :F]) * gu[:, F:] for gu (N, 2F) (gate and up side by side, as the
 * fused gate_up matmul returns them); silu(g) = g / (1 + e^-g). */
int kvtier_silu_mul(const void *gu, int64_t N, int64_t F, int bf16, void *out, int threads) {
    if (N < 0 || F < 1) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (N * F >= 32768)
    for (int64_t n = 0; n < N; n++) {
        int64_t f = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        for (; f + 16 <= F; f += 16) {
            const __m512 y = silu_mul16(load16_as_float(gu, n * 2 * F + f, bf16), load16_as_float(gu, n * 2 * F + F + f, bf16), bf16);
            if (bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)out + n * F + f), (__m256i)_mm512_cvtneps_pbh(y));
            else _mm512_storeu_ps((float *)out + n * F + f, y);
        }
#endif
        for (; f < F; f++) {
            const float g = load(gu, n * 2 * F + f, bf16), u = load(gu, n * 2 * F + F + f, bf16);
            float s = g / (1.0f + expf(-g));
            if (bf16) s = bf16_to_float(float_to_bf16(s));  /* torch rounds silu's output first */
            store(out, n * F + f, s * u, bf16);
        }
    }
    return 0;
}

/* 1 when every element of x (A, R, C) is finite (no NaN, no Inf), else 0: rows of C contiguous,
 * element (a, r, c) at a * sa + r * sr + c. An exponent field of all ones is what NaN and Inf
 * share. The reference is torch.isfinite(x).all(). */
int kvtier_all_finite(const void *x, int64_t A, int64_t R, int64_t C, int64_t sa, int64_t sr, int bf16, int threads) {
    const uint32_t exp = bf16 ? 0x7f80u : 0x7f800000u;
    uint32_t bad = 0;
    #pragma omp parallel for collapse(2) reduction(| : bad) schedule(static) num_threads(threads) if (A * R * C >= 65536)
    for (int64_t a = 0; a < A; a++)
        for (int64_t r = 0; r < R; r++) {
            const int64_t at = a * sa + r * sr;
            int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            if (bf16) { /* 32 at a time: an exponent of all ones in any lane */
                const __m512i e = _mm512_set1_epi16((short)exp);
                for (; c + 32 <= C; c += 32) {
                    const __m512i v = _mm512_and_si512(_mm512_loadu_si512((const uint16_t *)x + at + c), e);
                    bad |= _mm512_cmpeq_epi16_mask(v, e) != 0;
                }
            } else {
                const __m512i e = _mm512_set1_epi32((int)exp);
                for (; c + 16 <= C; c += 16) {
                    const __m512i v = _mm512_and_si512(_mm512_loadu_si512((const uint32_t *)x + at + c), e);
                    bad |= _mm512_cmpeq_epi32_mask(v, e) != 0;
                }
            }
#endif
            if (bf16) {
                const uint16_t *row = (const uint16_t *)x + at;
                for (; c < C; c++) bad |= (row[c] & exp) == exp;
            } else {
                const uint32_t *row = (const uint32_t *)x + at;
                for (; c < C; c++) bad |= (row[c] & exp) == exp;
            }
        }
    return !bad;
}

/* For each of n entries: the (H, D) slice of token row src_row[i] of k and of v (element
 * (h, r, d) of k at h * ksh + r * ksr + d, of v at h * vsh + r * vsr + d) copied to the
 * addresses dk[i], dv[i] (element (h, d) at h * dh + d); `elem` bytes an element. A decode
 * step's new keys and values into each sequence's residual row, one call per layer; the
 * reference is a copy_ per slice. */
int kvtier_copy_rows(const void *k, const void *v, int64_t ksh, int64_t ksr, int64_t vsh, int64_t vsr, int64_t n,
                     const int64_t *src_row, const int64_t *dk, const int64_t *dv, int64_t dh, int64_t H, int64_t D,
                     int elem) {
    if (n < 0 || H < 1 || D < 1 || (elem != 2 && elem != 4)) return -1;
    for (int64_t i = 0; i < n; i++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t to = h * dh * elem;
            memcpy((char *)(intptr_t)dk[i] + to, (const char *)k + (h * ksh + src_row[i] * ksr) * elem, (size_t)(D * elem));
            memcpy((char *)(intptr_t)dv[i] + to, (const char *)v + (h * vsh + src_row[i] * vsr) * elem, (size_t)(D * elem));
        }
    return 0;
}
