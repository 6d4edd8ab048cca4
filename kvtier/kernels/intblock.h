/* Per-block arithmetic on packed integer KV blocks (the `int` codec's layout), shared by
 * intattn.c (one run of blocks, all heads) and batched.c (every decoding sequence at once).
 * See intattn.c for the layout. */
#ifndef KVTIER_INTBLOCK_H
#define KVTIER_INTBLOCK_H
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAXD 256
#define MAXR 32
#define MAXB 256
#define INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(64)));      /* 16 floats (one AVX-512 register) */
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));

/* 16 codes of one plane: bytes p[0..15] shifted and masked, as floats */
INLINE vf codes16(const uint8_t *p, int shift, int mask) {
#ifdef __AVX512F__  /* gcc 12 builds the generic widening below from 16 scalar inserts */
    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return (vf)_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(x, shift), _mm512_set1_epi32(mask)));
#else
    vb b;
    memcpy(&b, p, sizeof b);
    vi x = __builtin_convertvector(b, vi);
    return __builtin_convertvector((x >> shift) & mask, vf);
#endif
}

/* scores of one key block: s[r*ld + t] for t < B (B a multiple of 16). Codes are read once per
 * channel for all B tokens and all R query rows accumulate in registers. */
INLINE void key_block(const uint8_t *kb, const float *qs, const float *bias, float *s, long ld,
                      const int R, const int BITS, const int D, const int B) {
    const int planes = 8 / BITS, m = D / planes, mask = (1 << BITS) - 1, nb = B / 16;
    vf acc[MAXR][MAXB / 16];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < nb; u++) acc[r][u] = (vf){} + bias[r];
    for (int j = 0; j < m; j++)
        for (int i = 0; i < planes; i++) {
            vf cv[MAXB / 16];
            for (int u = 0; u < nb; u++) cv[u] = codes16(kb + (long)j * B + 16 * u, i * BITS, mask);
            for (int r = 0; r < R; r++) {
                const float a = qs[r * D + i * m + j];
                for (int u = 0; u < nb; u++) acc[r][u] += a * cv[u];
            }
        }
    for (int r = 0; r < R; r++) memcpy(s + r * ld, acc[r], sizeof(float) * B);
}

/* o[r, :] = sum_t p[r, t] * (scale[t, g] * code[t, :] + zero[t, g]) over n tokens: the scale
 * folds into the weight, the zero into one sum per group, the codes go straight from bytes
 * to registers (group a multiple of 16, D*BITS/8 a multiple of 16). */
INLINE void value_rows(const uint8_t *v, const _Float16 *vs, const _Float16 *vz, const float *p,
                       long ld, int n, int group, float *o, const int R, const int BITS, const int D) {
    const int planes = 8 / BITS, m = D / planes, mask = (1 << BITS) - 1, ng = D / group;
    vf acc[MAXR][MAXD / 16];
    float zacc[MAXR][MAXD / 16];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < D / 16; u++) { acc[r][u] = (vf){}; zacc[r][u] = 0.f; }
    for (int t = 0; t < n; t++) {
        const uint8_t *row = v + (long)t * m;
        float w[MAXR][MAXD / 16];
        for (int g = 0; g < ng; g++) {
            const float sc = (float)vs[(long)t * ng + g], z = (float)vz[(long)t * ng + g];
            for (int r = 0; r < R; r++) {
                const float pt = p[r * ld + t];
                w[r][g] = pt * sc;
                zacc[r][g] += pt * z;
            }
        }
        for (int i = 0; i < planes; i++)
            for (int u = 0; u < m / 16; u++) {
                const vf cv = codes16(row + 16 * u, i * BITS, mask);
                const int ch = (i * m) / 16 + u, g = ch * 16 / group;
                for (int r = 0; r < R; r++) acc[r][ch] += w[r][g] * cv;
            }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < D / 16; u++) {
            const vf out = acc[r][u] + zacc[r][u * 16 / group];
            memcpy(o + (long)r * D + 16 * u, &out, sizeof out);
        }
}

/* intattn.c: one head's pieces over blocks [b0, b1) (its specialised shapes, compiled once) */
void kvtier_int_span(const float *q, int rows, int d, int bits, int group, int block, int b0, int b1,
                     const uint8_t *k, const _Float16 *ks, const _Float16 *kz,
                     const uint8_t *v, const _Float16 *vs, const _Float16 *vz,
                     float *m, float *l, float *o);

#endif
