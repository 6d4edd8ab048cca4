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

/* 16 fp16 values as floats */
INLINE vf half16(const _Float16 *p) {
#ifdef __AVX512F__
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    vf out;
    for (int i = 0; i < 16; i++) out[i] = (float)p[i];
    return out;
#endif
}

/* qs[r, c] = q[r, c] * scale[c] and bias[r] = sum_c q[r, c] * zero[c]: a block's per-channel key
 * scales and zeros folded into the query rows, 16 channels at a time (D is a multiple of 16
 * wherever the kernels take a shape; a scalar loop's one running sum was a chain of dependent
 * adds, a fifth of an 8K-token call). */
INLINE void fold_scales(const float *q, const _Float16 *ks, const _Float16 *kz, float *qs, float *bias,
                        const int R, const int D) {
    for (int r = 0; r < R; r++) {
        vf acc = {};
        for (int c = 0; c < D; c += 16) {
            vf qv;
            memcpy(&qv, q + r * D + c, sizeof qv);
            const vf folded = qv * half16(ks + c);
            memcpy(qs + r * D + c, &folded, sizeof folded);
            acc += qv * half16(kz + c);
        }
        float sum = 0.f;
        for (int i = 0; i < 16; i++) sum += acc[i];
        bias[r] = sum;
    }
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
    if (16 % ng == 0) {
        /* 16 tokens at a time (n is whole blocks, a multiple of 16): their weights p * scale and
         * zero sums p * zero as vectors over the (token, group) pairs, 16 / ng tokens a vector
         * (lane l: group l % ng). Per token in scalars, the zero sums were a chain of dependent
         * adds through memory, a quarter of an 8K-token call. */
        vf zsum[MAXR];
        vi rep[16];  /* the p lanes of sub-vector j: token 16 / ng * j + l / ng */
        for (int j = 0; j < ng; j++)
            for (int l = 0; l < 16; l++) rep[j][l] = 16 / ng * j + l / ng;
        for (int r = 0; r < R; r++) zsum[r] = (vf){};
        for (int t0 = 0; t0 < n; t0 += 16) {
            float w[MAXR][16 * 16];  /* w[r][t * ng + g], t from t0 */
            for (int r = 0; r < R; r++) {
                vf pv;
                memcpy(&pv, p + r * ld + t0, sizeof pv);
                for (int j = 0; j < ng; j++) {
                    const vf pj = ng == 1 ? pv : __builtin_shuffle(pv, rep[j]);
                    const long i = (long)t0 * ng + 16 * j;
                    const vf wv = pj * half16(vs + i);
                    memcpy(w[r] + 16 * j, &wv, sizeof wv);
                    zsum[r] += pj * half16(vz + i);
                }
            }
            for (int t = 0; t < 16; t++) {
                const uint8_t *row = v + (long)(t0 + t) * m;
                for (int i = 0; i < planes; i++)
                    for (int u = 0; u < m / 16; u++) {
                        const vf cv = codes16(row + 16 * u, i * BITS, mask);
                        const int ch = (i * m) / 16 + u, g = ch * 16 / group;
                        for (int r = 0; r < R; r++) acc[r][ch] += w[r][t * ng + g] * cv;
                    }
            }
        }
        for (int r = 0; r < R; r++)
            for (int g = 0; g < ng; g++) {
                float sum = 0.f;
                for (int l = g; l < 16; l += ng) sum += zsum[r][l];
                zacc[r][g] = sum;
            }
    } else {  /* groups that do not divide 16 (e.g. 3 of 32 in 96 channels): a token at a time */
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
