/* Decode attention for every decoding sequence of a batch, one call per layer, in fp32 (bf16
 * dot products for bf16 parts when the model computes in bf16: plain_bf16).
 *
 * Each sequence s brings one pre-scaled query per head, q[s, Hq, D], and the list of its parts
 * (kvtier.attention.batched packs them as PartDesc rows): runs of keys/values at positions
 * start .. start + n - 1, either plain tensors (fp32, bf16 or fp16; token rows of D elements
 * at any head and token stride) or the `int` codec's packed blocks (layout in intattn.c).
 * Query head h reads KV head h / G (GQA, G = Hq / Hkv); a key is visible when its position p
 * has lo[s] <= p <= q_pos[s] (causal, and a sliding window's first visible position).
 *
 * Work is cut into (sequence, KV head, split) tasks on `threads` OpenMP threads: a split is a
 * share of the sequence's visible tokens (more than one only when there are fewer
 * (sequence, head) pairs than threads). A task keeps a running softmax (max m, sum l,
 * unnormalised output o) for its G query rows, folding in one chunk of keys at a time (64
 * tokens of a plain part; an int part's blocks seen whole in one piece from intattn.c's
 * kernel, a block the window cuts on its own, masked); the splits of a (sequence, head) are
 * then merged by log-sum-exp, as kvtier.attention.blockwise.merge does, and normalised.
 * On a CPU with AMX, when the queries are bf16, bf16 keys are scored 16 at a time on the tiles
 * (plain_bf16: ~10 % of a 16-sequence layer here), and 2- and 4-bit int blocks are attended on
 * them whole, keys and values (int_blocks_amx: 2.3x the vector path; `KVTIER_AMX=0` compares).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "amx.h"
#include "intblock.h"
#include "spanfn.h"
#include "vexp.h"

enum { F32 = 0, BF16 = 1, F16 = 2, INT = 3, SPAN = 4 };

/* One part, all int64 (kvtier.attention.batched.FIELDS names them in this order). Strides are
 * in elements; plain parts use k, v, k_hs .. v_ts; int parts every field but the token strides.
 * A SPAN part is a run of any other codec's blocks, attended by that codec's own kernel: k is
 * its span function (spanfn.h), v its job (made by the codec's kvtier_*_job), block its block
 * size; ks and kz, when not 0, the fp32 (Hkv, D, D) matrices the codec's head space is turned
 * by (the query's rows times ks[h] before, the output's times kz[h] after: a rotation, a
 * channel order). A sliding window may cut its head: the codec's kernel is told how many
 * tokens of the first visible block to skip. It must not reach past the query. */
typedef struct {
    int64_t kind, n, start;
    int64_t k, v;                     /* addresses */
    int64_t k_hs, k_ts, v_hs, v_ts;   /* head and token strides */
    int64_t ks, kz, vs, vz;           /* int: fp16 key scale/zero, value scale/zero */
    int64_t ks_hs, vs_hs;             /* int: head strides of the scales (zeros alike) */
    int64_t bits, group, block;       /* int */
} PartDesc;

typedef struct {
    const float *q;                   /* (S, Hq, D) */
    const PartDesc *parts;
    const int64_t *seq_parts;         /* (S + 1,): sequence s owns parts[seq_parts[s] ..] */
    const int64_t *q_pos, *lo;        /* (S,) */
    int n_seq, n_kv, g, d, splits;
    int q_bf16;                       /* the queries were bf16: bf16 parts may use bf16 products */
    int amx;                          /* bf16 parts' scores on AMX tiles (configured per thread) */
    float *m, *l, *o;                 /* per task: g, g, g * d */
} Job;

#define CH 64  /* tokens of a plain part scored at a time */

INLINE int visible(const Job *J, int s, const PartDesc *P, long *a, long *b) {
    /* part-local range [a, b) of the tokens the query of sequence s sees */
    long first = J->lo[s] > P->start ? J->lo[s] : P->start;
    long last = J->q_pos[s] + 1 < P->start + P->n ? J->q_pos[s] + 1 : P->start + P->n;
    *a = first - P->start;
    *b = last - P->start;
    return *b > *a;
}

/* Fold the scores s[r * ld + t] of a chunk (visible t in [ta, tb), nt in all) into the running
 * (m, l, o); leaves p = exp(s - m) in s, 0 for the tokens outside [ta, tb). */
INLINE void softmax_step(float *s, long ld, int ta, int tb, int nt, float *m, float *l, float *o,
                         const int G, const int D) {
    for (int r = 0; r < G; r++) {
        float *sr = s + r * ld, top = -FLT_MAX, sum = 0.f;
        for (int t = ta; t < tb; t++) top = sr[t] > top ? sr[t] : top;
        if (top > m[r]) {  /* a new max: the running sums shrink to its scale */
            const float w = l[r] > 0.f ? expf(m[r] - top) : 0.f;
            l[r] *= w;
            for (int c = 0; c < D; c++) o[r * D + c] *= w;
            m[r] = top;
        }
        for (int t = 0; t < ta; t++) sr[t] = 0.f;
        int t = ta;
#ifdef __AVX512F__
        __m512 vsum = _mm512_setzero_ps();
        for (const __m512 vm = _mm512_set1_ps(m[r]); t + 16 <= tb; t += 16) {  /* 16 lanes inline */
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + t), vm));
            _mm512_storeu_ps(sr + t, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        sum = _mm512_reduce_add_ps(vsum);
#endif
        for (; t < tb; t++) { sr[t] = expf(sr[t] - m[r]); sum += sr[t]; }
        for (int t = tb; t < nt; t++) sr[t] = 0.f;
        l[r] += sum;
    }
}

typedef uint16_t vh __attribute__((vector_size(32)));    /* 16 bf16 bit patterns */
typedef _Float16 vhf __attribute__((vector_size(32)));   /* 16 fp16 */

/* 16 elements at p as fp32 */
INLINE vf load16(const char *p, const int KIND) {
    vf x;
    if (KIND == F32) {
        memcpy(&x, p, sizeof x);
    } else if (KIND == BF16) {  /* bf16 is the high half of an fp32 */
#ifdef __AVX512F__
        x = (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
        vh b;
        memcpy(&b, p, sizeof b);
        x = (vf)(__builtin_convertvector(b, vi) << 16);
#endif
    } else {
#ifdef __AVX512F__
        x = (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));  /* gcc's own is scalar */
#else
        vhf b;
        memcpy(&b, p, sizeof b);
        x = __builtin_convertvector(b, vf);
#endif
    }
    return x;
}

/* one level of the lane-folding tree: within each 2d-lane segment, x's two halves summed into
 * the low d lanes and y's into the high d */
#define FOLD(x, y, LO, HI) (__builtin_shuffle(x, y, (vi)LO) + __builtin_shuffle(x, y, (vi)HI))
#define LO8 {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}
#define HI8 {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}
#define LO4 {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}
#define HI4 {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}
#define LO2 {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}
#define HI2 {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}
#define LO1 {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}
#define HI1 {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}

/* the lane sums of 16 vectors in one vector: 15 folds instead of 16 horizontal sums. Lane l
 * of the result sums a[rev(l)] (rev: 4-bit reversal), so callers store token t at a[rev(t)]. */
INLINE vf fold16(const vf *a) {
    vf b[8], c[4];
    for (int i = 0; i < 8; i++) b[i] = FOLD(a[2 * i], a[2 * i + 1], LO8, HI8);
    for (int i = 0; i < 4; i++) c[i] = FOLD(b[2 * i], b[2 * i + 1], LO4, HI4);
    const vf d0 = FOLD(c[0], c[1], LO2, HI2), d1 = FOLD(c[2], c[3], LO2, HI2);
    return FOLD(d0, d1, LO1, HI1);
}

static const int REV4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

/* tokens [t0, t1) of a plain part, KV head h (D a multiple of 16, as every call's): each key row is read once
 * for the G query rows, 16 tokens' dot products folded together; the values' weighted sum
 * accumulates in registers over a chunk */
INLINE void plain_part(const PartDesc *P, int h, long t0, long t1, const float *q,
                       float *m, float *l, float *o, const int KIND, const int G, const int D) {
    const long es = KIND == F32 ? 4 : 2;
    const char *kb = (const char *)P->k + h * P->k_hs * es, *vb = (const char *)P->v + h * P->v_hs * es;
    const long kts = P->k_ts * es, vts = P->v_ts * es;
    float s[MAXR * CH];
    vf qv[MAXR][MAXD / 16];
    for (int r = 0; r < G; r++)
        for (int u = 0; u < D / 16; u++) memcpy(&qv[r][u], q + r * D + 16 * u, sizeof(vf));
    for (long c0 = t0; c0 < t1; c0 += CH) {
        const int nt = t1 - c0 < CH ? (int)(t1 - c0) : CH;
        for (int g0 = 0; g0 < nt; g0 += 16) {  /* 16 tokens' scores (a short tail zero-padded) */
            vf part[MAXR][16];
            for (int t = 0; t < 16; t++) {
                vf k[MAXD / 16];
                if (g0 + t < nt) {
                    for (int u = 0; u < D / 16; u++) k[u] = load16(kb + (c0 + g0 + t) * kts + 16 * u * es, KIND);
                } else {
                    for (int u = 0; u < D / 16; u++) k[u] = (vf){};
                }
                for (int r = 0; r < G; r++) {
                    vf acc = qv[r][0] * k[0];
                    for (int u = 1; u < D / 16; u++) acc += qv[r][u] * k[u];
                    part[r][REV4[t]] = acc;
                }
            }
            for (int r = 0; r < G; r++) {
                const vf sc = fold16(part[r]);
                memcpy(s + r * CH + g0, &sc, sizeof sc);  /* s has CH >= g0 + 16 columns */
            }
        }
        softmax_step(s, CH, 0, nt, nt, m, l, o, G, D);
        vf acc[MAXR][MAXD / 16];
        for (int r = 0; r < G; r++)
            for (int u = 0; u < D / 16; u++) memcpy(&acc[r][u], o + r * D + 16 * u, sizeof(vf));
        for (int t = 0; t < nt; t++) {
            vf v[MAXD / 16];
            for (int u = 0; u < D / 16; u++) v[u] = load16(vb + (c0 + t) * vts + 16 * u * es, KIND);
            for (int r = 0; r < G; r++) {
                const float p = s[r * CH + t];
                for (int u = 0; u < D / 16; u++) acc[r][u] += p * v[u];
            }
        }
        for (int r = 0; r < G; r++)
            for (int u = 0; u < D / 16; u++) memcpy(o + r * D + 16 * u, &acc[r][u], sizeof(vf));
    }
}

#ifdef __AVX512BF16__
/* plain_part for bf16 keys and values when the queries are bf16 too (a bf16 model): both
 * products on AVX512-BF16's dot-product instruction, two bf16 products summed into each fp32
 * lane. Scores: a key row's 32 channel pairs against the query's, 16 tokens folded as above.
 * Values: rows t and t+1 interleaved (unpacklo/hi of 16-bit words), so a row's pair of
 * softmax weights (rounded to bf16, as torch's bf16 attention rounds them) is broadcast against
 * 16 channels; the interleave permutes the channels within 128-bit lanes, undone once a chunk. */
INLINE void plain_bf16(const PartDesc *P, int h, long t0, long t1, const float *q,
                       float *m, float *l, float *o, const int G, const int D, const int amx) {
    const uint16_t *kb = (const uint16_t *)P->k + h * P->k_hs, *vb = (const uint16_t *)P->v + h * P->v_hs;
    const long kts = P->k_ts, vts = P->v_ts;
    float s[MAXR * CH] __attribute__((aligned(64)));
    uint32_t pw[MAXR][CH / 2] __attribute__((aligned(64)));
    __m512bh qb[MAXR][MAXD / 32];
    for (int r = 0; r < G; r++)
        for (int u = 0; u < D / 32; u++)
            qb[r][u] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + r * D + 32 * u + 16), _mm512_loadu_ps(q + r * D + 32 * u));
#ifdef KVT_AMX
    /* S^T (16 keys x 16 query rows) = K Q^T on the tiles: the A tile is 16 key rows of 32
     * channels as they lie in memory, the B tile the queries' 32 channels pair-interleaved
     * (row p: each query row's channels 2p, 2p + 1), made here once per task */
    uint32_t qt[MAXD / 32][16][16] __attribute__((aligned(64)));
    if (amx) {
        memset(qt, 0, sizeof(uint32_t) * 256 * (D / 32));
        for (int r = 0; r < G; r++)
            for (int u = 0; u < D / 32; u++) {
                uint32_t pairs[16];
                memcpy(pairs, &qb[r][u], sizeof pairs);
                for (int p = 0; p < 16; p++) qt[u][p][r] = pairs[p];
            }
    }
    const __m512i col = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
#else
    (void)amx;
#endif
    const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (long c0 = t0; c0 < t1; c0 += CH) {
        const int nt = t1 - c0 < CH ? (int)(t1 - c0) : CH;
        for (int g0 = 0; g0 < nt; g0 += 16) {
#ifdef KVT_AMX
            if (amx) {
                const int rows = nt - g0 < 16 ? nt - g0 : 16;
                const uint16_t *src = kb + (c0 + g0) * kts;
                long stride = kts * 2;
                uint16_t pad[16 * MAXD] __attribute__((aligned(64)));
                if (rows < 16) {
                    memset(pad, 0, sizeof(uint16_t) * 16 * D);
                    for (int t = 0; t < rows; t++) memcpy(pad + t * D, src + t * kts, sizeof(uint16_t) * D);
                    src = pad;
                    stride = (long)D * 2;
                }
                _tile_zero(0);
                for (int u = 0; u < D / 32; u++) {
                    _tile_loadd(1, src + 32 * u, stride);
                    _tile_loadd(2, qt[u], 64);
                    _tile_dpbf16ps(0, 1, 2);
                }
                float st[16][16] __attribute__((aligned(64)));
                _tile_stored(0, st, 64);
                for (int r = 0; r < G; r++)
                    _mm512_storeu_ps(s + r * CH + g0, _mm512_i32gather_ps(col, &st[0][r], 4));
                continue;
            }
#endif
            vf part[MAXR][16];
            for (int t = 0; t < 16; t++) {
                if (g0 + t < nt) {
                    __m512bh k[MAXD / 32];
                    for (int u = 0; u < D / 32; u++)
                        k[u] = (__m512bh)_mm512_loadu_si512(kb + (c0 + g0 + t) * kts + 32 * u);
                    for (int r = 0; r < G; r++) {
                        __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[r][0], k[0]);
                        for (int u = 1; u < D / 32; u++) acc = _mm512_dpbf16_ps(acc, qb[r][u], k[u]);
                        part[r][REV4[t]] = (vf)acc;
                    }
                } else {
                    for (int r = 0; r < G; r++) part[r][REV4[t]] = (vf){};
                }
            }
            for (int r = 0; r < G; r++) {
                const vf sc = fold16(part[r]);
                memcpy(s + r * CH + g0, &sc, sizeof sc);
            }
        }
        softmax_step(s, CH, 0, nt, nt, m, l, o, G, D);
        for (int r = 0; r < G; r++) {  /* weights as bf16 pairs, zero past the chunk's end */
            float *sr = s + r * CH;
            for (int t = nt; t < CH; t++) sr[t] = 0.f;
            for (int t = 0; t < CH; t += 32)
                _mm512_store_si512(pw[r] + t / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(sr + t + 16),
                                                                               _mm512_load_ps(sr + t)));
        }
        __m512 lo[MAXR][MAXD / 32], hi[MAXR][MAXD / 32];
        for (int r = 0; r < G; r++)
            for (int u = 0; u < D / 32; u++) lo[r][u] = hi[r][u] = _mm512_setzero_ps();
        for (int t = 0; t < nt; t += 2) {
            const uint16_t *v0 = vb + (c0 + t) * vts, *v1 = v0 + vts;
            for (int u = 0; u < D / 32; u++) {
                const __m512i a = _mm512_loadu_si512(v0 + 32 * u),
                              b = t + 1 < nt ? _mm512_loadu_si512(v1 + 32 * u) : _mm512_setzero_si512();
                const __m512bh il = (__m512bh)_mm512_unpacklo_epi16(a, b), ih = (__m512bh)_mm512_unpackhi_epi16(a, b);
                for (int r = 0; r < G; r++) {
                    const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pw[r][t / 2]);
                    lo[r][u] = _mm512_dpbf16_ps(lo[r][u], w, il);
                    hi[r][u] = _mm512_dpbf16_ps(hi[r][u], w, ih);
                }
            }
        }
        for (int r = 0; r < G; r++)
            for (int u = 0; u < D / 32; u++) {  /* channel 32u + 8L + i sits in lane 4L + i of lo (i < 4), of hi (i >= 4) */
                float *dst = o + r * D + 32 * u;
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_permutex2var_ps(lo[r][u], lo_idx, hi[r][u])));
                _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_loadu_ps(dst + 16),
                                                         _mm512_permutex2var_ps(lo[r][u], hi_idx, hi[r][u])));
            }
    }
}
#endif

/* Fold softmax pieces (pm, pl, po) of some keys into the running (m, l, o). */
INLINE void absorb(const float *pm, const float *pl, const float *po, float *m, float *l, float *o,
                   int G, int D) {
    for (int r = 0; r < G; r++) {
        if (pl[r] <= 0.f) continue;
        const float top = l[r] > 0.f && m[r] > pm[r] ? m[r] : pm[r];
        const float wa = l[r] > 0.f ? expf(m[r] - top) : 0.f, wb = expf(pm[r] - top);
        for (int c = 0; c < D; c++) o[r * D + c] = o[r * D + c] * wa + po[r * D + c] * wb;
        l[r] = l[r] * wa + pl[r] * wb;
        m[r] = top;
    }
}

/* block j of an int part, head pointers given, its part-local tokens outside [a, b) masked */
INLINE void masked_block(const PartDesc *P, const uint8_t *kp, const _Float16 *ks, const _Float16 *kz,
                         const uint8_t *vp, const _Float16 *vs, const _Float16 *vz, long j, long a, long b,
                         const float *q, float *m, float *l, float *o, int G, const int BITS, int D, int B) {
    const int mb = D * BITS / 8, group = (int)P->group, ng = D / group;
    float s[MAXR * MAXB], qs[MAXR * MAXD], bias[MAXR], ob[MAXR * MAXD];
    fold_scales(q, ks + j * D, kz + j * D, qs, bias, G, D);  /* the block's key scales into the query */
    key_block(kp + j * B * mb, qs, bias, s, B, G, BITS, D, B);
    const long ta = a - j * B > 0 ? a - j * B : 0, tb = b - j * B < B ? b - j * B : B;
    softmax_step(s, B, (int)ta, (int)tb, B, m, l, o, G, D);
    value_rows(vp + j * B * mb, vs + j * B * ng, vz + j * B * ng, s, B, B, group, ob, G, BITS, D);
    for (int i = 0; i < G * D; i++) o[i] += ob[i];
}

#if defined(KVT_AMX) && defined(__AVX512VBMI__)
/* The `int` codec's 2- and 4-bit blocks on the tiles (any of the eight: plain_bf16 loads its own
 * each time). A b-bit code c enters a tile as the bf16 number 1 + c / 2^b (c in the top mantissa
 * bits under 1.0's exponent: a shift and an OR, no conversion) against a factor scaled by 2^b;
 * the 1 comes back out as one sum per row, about as large as the sum it is taken from. The fp32
 * factors on the other side (query x key scale, softmax weight x value scale) are each split
 * into two bf16 (top + rest: 16 bits of mantissa), so the products keep close to fp32 precision.
 *   scores  C (query rows x 16 tokens) += A (rows x 32 channels) B (16 channel pairs x 16 tokens):
 *           byte row j of a key block holds, for every token, channel i*m + j in plane i, so
 *           planes 2pp and 2pp + 1 of one byte make a B row's channel pair for its token;
 *   values  C (rows x 16 channels) += A (rows x 32 tokens) B (16 token pairs x 16 channels):
 *           a pair of consecutive token rows is read as one vector, and each group of 16
 *           channels picks its bytes out of it with one byte permute (VBMI). */
#define T_A 4  /* A: the top halves in rows 0 .. G - 1, the rests in rows G .. 2G - 1 */
#define T_B 6  /* codes */

/* 16-bit words with a b-bit code in their low bits -> bf16 1 + code / 2^b: the code under the
 * mantissa's top, 1.0's bits OR-ed in ((x & masks) | ones: ternary-logic 0xEA) */
INLINE __m512i as_bf16_pairs(__m512i x, const int BITS) {
    const int top = ((1 << BITS) - 1) << (7 - BITS);
    return _mm512_ternarylogic_epi32(_mm512_slli_epi16(x, 7 - BITS), _mm512_set1_epi32(top | top << 16),
                                     _mm512_set1_epi32(0x3F803F80), 0xEA);
}

INLINE __m512i widen_bf16(__m256i h) { return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16); }

/* w split into top + rest (bf16 each); returns top + rest in fp32 */
INLINE __m512 split_bf16(__m512 w, __m256i *top, __m256i *rest) {
    *top = (__m256i)_mm512_cvtneps_pbh(w);
    const __m512 t = (__m512)widen_bf16(*top);
    *rest = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(w, t));
    return _mm512_add_ps(t, (__m512)widen_bf16(*rest));
}

/* C tile n (0 .. 3, a compile-time tile number) += A B */
#define DP_CASES(n) do { switch (n) { \
    case 0: _tile_dpbf16ps(0, T_A, T_B); break; \
    case 1: _tile_dpbf16ps(1, T_A, T_B); break; \
    case 2: _tile_dpbf16ps(2, T_A, T_B); break; \
    default: _tile_dpbf16ps(3, T_A, T_B); break; } } while (0)

/* blocks [j0, j1) of an int part (2 or 4 bits, a token pair's rows at most 128 bytes, G <= 8),
 * KV head pointers given, part-local tokens outside [a, b) masked. A query row's top and rest
 * are two rows of one A tile, so one tile product gives both; their C rows are summed after. */
INLINE void int_blocks_amx(const PartDesc *P, const uint8_t *kp, const _Float16 *ks, const _Float16 *kz,
                           const uint8_t *vp, const _Float16 *vs, const _Float16 *vz, long j0, long j1,
                           long a, long b, const float *q, float *m, float *l, float *o,
                           const int G, const int BITS, const int D) {
    const int B = (int)P->block, mb = D * BITS / 8, planes = 8 / BITS, pm = D / planes;
    const int group = (int)P->group, ng = D / group, ncg = D / 16;
    const __m512 scale = _mm512_set1_ps((float)(1 << BITS));  /* the factors' 2^b (exact) */
    uint32_t aq[MAXD / 32][16][16] __attribute__((aligned(64)));     /* keys' A, per K step */
    uint32_t aw[4][16][16] __attribute__((aligned(64)));             /* values' A, per group of a pass */
    uint32_t bt[4][16][16] __attribute__((aligned(64)));             /* B tiles */
    float sc[16 * (MAXB + 32)] __attribute__((aligned(64)));         /* scores, then weights */
    float ob[MAXD / 16][16][16] __attribute__((aligned(64)));
    float bias[MAXR], asum[MAXR][MAXD / 16], zsum[MAXR][MAXD / 16];
    memset(aq, 0, sizeof(aq[0]) * (D / 32));  /* rows 2G .. 15 stay zero */
    memset(aw, 0, sizeof aw);
    /* keys: byte n of a 16-byte load to bytes 4n and 4n + 2, shifted to planes 2pp and 2pp + 1 */
    uint8_t kidx[64];
    for (int n = 0; n < 64; n++) kidx[n] = (uint8_t)(n / 4);
    const __m512i kperm = _mm512_loadu_si512(kidx);
    /* values: group cg's 16 channels (plane cg*16 / pm, bytes j16 ..) of the pair's first row to
     * bytes 4c, of its second (mb bytes on) to 4c + 2 */
    __m512i vperm[MAXD / 16];
    int vshift[MAXD / 16];
    for (int cg = 0; cg < ncg; cg++) {
        uint8_t idx[64];
        const int j16 = 16 * cg % pm;
        for (int n = 0; n < 64; n++) idx[n] = (uint8_t)(j16 + n / 4 + (n % 4 >= 2 ? mb : 0));
        vperm[cg] = _mm512_loadu_si512(idx);
        vshift[cg] = 16 * cg / pm * BITS;
    }
    const __mmask64 first = mb >= 64 ? ~0ULL : (1ULL << (2 * mb)) - 1;  /* the pair's bytes in the first load */
    const int ld = B + 32;  /* weights zero past the block, for a last K step of 16 tokens */
    for (long j = j0; j < j1; j++) {
        const long ta = a - j * B > 0 ? a - j * B : 0, tb = b - j * B < B ? b - j * B : B;
        for (int r = 0; r < G; r++) {  /* A = q x key scale, pair-interleaved; the bias */
            __m512 zacc = _mm512_setzero_ps(), aacc = _mm512_setzero_ps();
            for (int c = 0; c < D; c += 16) {
                const __m512 qv = _mm512_loadu_ps(q + r * D + c);
                zacc = _mm512_fmadd_ps(qv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kz + j * D + c))), zacc);
            }
            for (int u = 0; u < D / 32; u++) {  /* K step u: channel pairs 16u .. 16u + 15 */
                const int pp = 16 * u / pm, j16 = 16 * u % pm, c0 = 2 * pp * pm + j16, c1 = c0 + pm;
                __m256i t0, r0, t1, r1;
                const __m512 w0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(q + r * D + c0), scale),
                                                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ks + j * D + c0))));
                const __m512 w1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(q + r * D + c1), scale),
                                                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ks + j * D + c1))));
                aacc = _mm512_add_ps(aacc, _mm512_add_ps(split_bf16(w0, &t0, &r0), split_bf16(w1, &t1, &r1)));
                _mm512_store_si512(aq[u][r], _mm512_or_si512(_mm512_cvtepu16_epi32(t0), _mm512_slli_epi32(_mm512_cvtepu16_epi32(t1), 16)));
                _mm512_store_si512(aq[u][G + r], _mm512_or_si512(_mm512_cvtepu16_epi32(r0), _mm512_slli_epi32(_mm512_cvtepu16_epi32(r1), 16)));
            }
            bias[r] = _mm512_reduce_add_ps(zacc) - _mm512_reduce_add_ps(aacc);
        }
        const uint8_t *kb = kp + j * B * mb;
        for (int t0 = 0; t0 < B; t0 += 32) {  /* scores of 32 tokens (B a multiple of 16): C tiles 0, 1 */
            const int two = B - t0 > 16;
            _tile_zero(0);
            _tile_zero(1);
            for (int u = 0; u < D / 32; u++) {
                const int pp = 16 * u / pm, j16 = 16 * u % pm, sh = 2 * pp * BITS;
                const __m512i shifts = _mm512_set1_epi32(sh | (sh + BITS) << 16);
                for (int k = 0; k < 16; k++)
                    for (int c = 0; c <= two; c++) {
                        const __m128i x = _mm_loadu_si128((const __m128i *)(kb + (long)(j16 + k) * B + t0 + 16 * c));
                        const __m512i pairs = _mm512_permutexvar_epi8(kperm, _mm512_castsi128_si512(x));
                        _mm512_store_si512(bt[c][k], as_bf16_pairs(_mm512_srlv_epi16(pairs, shifts), BITS));
                    }
                _tile_loadd(T_A, aq[u], 64);
                _tile_loadd(T_B, bt[0], 64);
                _tile_dpbf16ps(0, T_A, T_B);
                if (two) {
                    _tile_loadd(7, bt[1], 64);
                    _tile_dpbf16ps(1, T_A, 7);
                }
            }
            _tile_stored(0, sc + t0, ld * 4);
            if (two) _tile_stored(1, sc + t0 + 16, ld * 4);
        }
        for (int r = 0; r < G; r++) {  /* top + rest + bias */
            const __m512 bv = _mm512_set1_ps(bias[r]);
            for (int t = 0; t < B; t += 16)
                _mm512_store_ps(sc + r * ld + t, _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(sc + r * ld + t),
                                                                             _mm512_load_ps(sc + (G + r) * ld + t)), bv));
        }
        softmax_step(sc, ld, (int)ta, (int)tb, B, m, l, o, G, D);  /* sc: weights, 0 outside [ta, tb) */
        for (int r = 0; r < G; r++) {
            memset(sc + r * ld + B, 0, sizeof(float) * 32);
            for (int g = 0; g < ng; g++) asum[r][g] = zsum[r][g] = 0.f;
        }
        const uint8_t *vb = vp + j * B * mb;
        const _Float16 *vsb = vs + j * B * ng, *vzb = vz + j * B * ng;
        for (int c0 = 0; c0 < ncg; c0 += 4) {  /* a pass: 16-channel groups c0 .. c0 + 3 in C tiles 0 .. 3 */
            const int nc = ncg - c0 < 4 ? ncg - c0 : 4, g0 = 16 * c0 / group, g1 = (16 * (c0 + nc) - 1) / group + 1;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int t0 = 0; t0 < B; t0 += 32) {  /* 32 tokens a K step */
                const int nk = B - t0 < 32 ? B - t0 : 32;
                for (int g = g0; g < g1; g++) {  /* A = weight x value scale, per group */
                    float sg[32] __attribute__((aligned(64))), zg[32] __attribute__((aligned(64)));
                    if (ng == 1) {  /* one group: the token's scales lie next to each other */
                        for (int hf = 0; hf < 2; hf++) {
                            const __mmask16 in = 16 * hf < nk ? 0xFFFF : 0;
                            _mm512_store_ps(sg + 16 * hf, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, vsb + t0 + 16 * hf)));
                            _mm512_store_ps(zg + 16 * hf, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, vzb + t0 + 16 * hf)));
                        }
                    } else {
                        for (int t = 0; t < 32; t++) {
                            sg[t] = t < nk ? (float)vsb[(long)(t0 + t) * ng + g] : 0.f;
                            zg[t] = t < nk ? (float)vzb[(long)(t0 + t) * ng + g] : 0.f;
                        }
                    }
                    const int once = g * group / 16 >= c0;  /* the group's sums counted in its first pass */
                    for (int r = 0; r < G; r++) {
                        __m256i tp[2], rs[2];
                        __m512 as = _mm512_setzero_ps(), zs = _mm512_setzero_ps();
                        for (int hf = 0; hf < 2; hf++) {
                            const __m512 p = _mm512_load_ps(sc + r * ld + t0 + 16 * hf);
                            as = _mm512_add_ps(as, split_bf16(_mm512_mul_ps(_mm512_mul_ps(p, scale), _mm512_load_ps(sg + 16 * hf)), &tp[hf], &rs[hf]));
                            zs = _mm512_fmadd_ps(p, _mm512_load_ps(zg + 16 * hf), zs);
                        }
                        _mm512_store_si512(aw[g - g0][r], _mm512_inserti64x4(_mm512_castsi256_si512(tp[0]), tp[1], 1));
                        _mm512_store_si512(aw[g - g0][G + r], _mm512_inserti64x4(_mm512_castsi256_si512(rs[0]), rs[1], 1));
                        if (once) {
                            asum[r][g] += _mm512_reduce_add_ps(as);
                            zsum[r][g] += _mm512_reduce_add_ps(zs);
                        }
                    }
                }
                for (int k = 0; k < 16; k++) {  /* B rows: token pair t0 + 2k, t0 + 2k + 1 */
                    if (2 * k >= nk) {
                        for (int c = 0; c < nc; c++) _mm512_store_si512(bt[c][k], _mm512_setzero_si512());
                        continue;
                    }
                    const uint8_t *row = vb + (long)(t0 + 2 * k) * mb;
                    const __m512i lo = _mm512_maskz_loadu_epi8(first, row);
                    const __m512i hi = mb > 32 ? _mm512_loadu_si512(row + 64) : lo;
                    for (int c = 0; c < nc; c++) {
                        const __m512i x = _mm512_permutex2var_epi8(lo, vperm[c0 + c], hi);
                        _mm512_store_si512(bt[c][k], as_bf16_pairs(_mm512_srli_epi16(x, vshift[c0 + c]), BITS));
                    }
                }
                int loaded = -1;
                for (int c = 0; c < nc; c++) {
                    const int g = 16 * (c0 + c) / group;
                    if (g != loaded) {
                        _tile_loadd(T_A, aw[g - g0], 64);
                        loaded = g;
                    }
                    _tile_loadd(T_B, bt[c], 64);
                    DP_CASES(c);
                }
            }
            _tile_stored(0, ob[c0], 64);
            if (nc > 1) _tile_stored(1, ob[c0 + 1], 64);
            if (nc > 2) _tile_stored(2, ob[c0 + 2], 64);
            if (nc > 3) _tile_stored(3, ob[c0 + 3], 64);
        }
        for (int r = 0; r < G; r++)  /* o += weighted codes - weights + weighted zeros */
            for (int cg = 0; cg < ncg; cg++) {
                const int g = 16 * cg / group;
                const __m512 add = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(ob[cg][r]), _mm512_load_ps(ob[cg][G + r])),
                                                 _mm512_set1_ps(zsum[r][g] - asum[r][g]));
                _mm512_storeu_ps(o + r * D + 16 * cg, _mm512_add_ps(_mm512_loadu_ps(o + r * D + 16 * cg), add));
            }
    }
}
#endif

/* blocks [j0, j1) of an int part, KV head h, part-local tokens outside [a, b) masked: the
 * blocks seen whole go to intattn.c's specialised kernel in one piece; a block cut by the
 * window (or the query's position) is scored here, masked. */
INLINE void int_part(const PartDesc *P, int h, long j0, long j1, long a, long b, const float *q,
                     float *m, float *l, float *o, const int G, const int D, int amx) {
    const int B = (int)P->block, bits = (int)P->bits;
    const uint8_t *kp = (const uint8_t *)P->k + h * P->k_hs, *vp = (const uint8_t *)P->v + h * P->v_hs;
    const _Float16 *ks = (const _Float16 *)P->ks + h * P->ks_hs, *kz = (const _Float16 *)P->kz + h * P->ks_hs;
    const _Float16 *vs = (const _Float16 *)P->vs + h * P->vs_hs, *vz = (const _Float16 *)P->vz + h * P->vs_hs;
#if defined(KVT_AMX) && defined(__AVX512VBMI__)
    if (amx && bits != 8 && D % 32 == 0 && D * bits / 8 <= 64 && G <= 8) {  /* a token pair in 128 bytes */
        if (bits == 4) int_blocks_amx(P, kp, ks, kz, vp, vs, vz, j0, j1, a, b, q, m, l, o, G, 4, D);
        else int_blocks_amx(P, kp, ks, kz, vp, vs, vz, j0, j1, a, b, q, m, l, o, G, 2, D);
        return;
    }
#else
    (void)amx;
#endif
    long w0 = (a + B - 1) / B, w1 = b / B;  /* blocks wholly visible */
    w0 = w0 > j0 ? w0 : j0;
    w1 = w1 < j1 ? w1 : j1;
    for (long j = j0; j < j1; j++) {
        if (j >= w0 && j < w1) continue;
        switch (bits) {
        case 2: masked_block(P, kp, ks, kz, vp, vs, vz, j, a, b, q, m, l, o, G, 2, D, B); break;
        case 4: masked_block(P, kp, ks, kz, vp, vs, vz, j, a, b, q, m, l, o, G, 4, D, B); break;
        default: masked_block(P, kp, ks, kz, vp, vs, vz, j, a, b, q, m, l, o, G, 8, D, B); break;
        }
    }
    if (w1 > w0) {
        float pm[MAXR], pl[MAXR], po[MAXR * MAXD];
        kvtier_int_span(q, G, D, bits, (int)P->group, B, (int)w0, (int)w1, kp, ks, kz, vp, vs, vz, pm, pl, po);
        absorb(pm, pl, po, m, l, o, G, D);
    }
}

/* blocks [j0, j1) of a SPAN part, KV head h, the first `skip` tokens of block j0 cut by a sliding
 * window: the codec's kernel in one piece, in its own head space (the query turned in, the
 * output turned back) */
INLINE void span_part(const PartDesc *P, int h, long j0, long j1, int skip, const float *q,
                      float *m, float *l, float *o, const int G, const int D) {
    float qt[MAXR * MAXD], pm[MAXR], pl[MAXR], po[MAXR * MAXD], ot[MAXD];
    const float *qm = (const float *)P->ks, *om = (const float *)P->kz;
    if (qm) {
        qm += (long)h * D * D;
        for (int r = 0; r < G; r++) {
            for (int c = 0; c < D; c++) qt[r * D + c] = 0.f;
            for (int i = 0; i < D; i++)
                for (int c = 0; c < D; c++) qt[r * D + c] += q[r * D + i] * qm[(long)i * D + c];
        }
    }
    ((span_fn)P->k)((const void *)P->v, qm ? qt : q, h, (int)j0, (int)j1, skip, pm, pl, po);
    if (om) {
        om += (long)h * D * D;
        for (int r = 0; r < G; r++) {
            for (int c = 0; c < D; c++) ot[c] = 0.f;
            for (int i = 0; i < D; i++)
                for (int c = 0; c < D; c++) ot[c] += po[r * D + i] * om[(long)i * D + c];
            memcpy(po + r * D, ot, sizeof(float) * D);
        }
    }
    absorb(pm, pl, po, m, l, o, G, D);
}

/* one task: sequence s, KV head h, split p of the sequence's visible tokens */
INLINE void task_body(const Job *J, int s, int h, int p, float *m, float *l, float *o,
                      const int G, const int D) {
    const float *q = J->q + ((long)s * J->n_kv + h) * G * D;  /* query heads h*G .. h*G+G-1 */
    const PartDesc *parts = J->parts + J->seq_parts[s];
    const int np = (int)(J->seq_parts[s + 1] - J->seq_parts[s]);
    for (int r = 0; r < G; r++) { m[r] = -FLT_MAX; l[r] = 0.f; }
    memset(o, 0, sizeof(float) * G * D);
    long total = 0, a, b;
    for (int i = 0; i < np; i++)
        if (visible(J, s, &parts[i], &a, &b)) total += b - a;
    /* this task's share [g0, g1) of the visible tokens, counted across the parts in order */
    const long g0 = total * p / J->splits, g1 = total * (p + 1) / J->splits;
    long c = 0;  /* visible tokens in the parts before this one */
    for (int i = 0; i < np && c < g1; i++) {
        const PartDesc *P = &parts[i];
        if (!visible(J, s, P, &a, &b)) continue;
        const long nv = b - a;
        if (c + nv > g0) {
            if (P->kind == INT || P->kind == SPAN) {  /* a block goes to the split that holds its first visible token */
                const long B = P->block;
                long j0 = -1, j1 = -1;
                for (long j = a / B; j <= (b - 1) / B; j++) {
                    const long first = c + (j * B > a ? j * B : a) - a;
                    if (first >= g0 && first < g1) { if (j0 < 0) j0 = j; j1 = j + 1; }
                }
                if (j0 >= 0 && P->kind == SPAN)  /* only the run's first visible block can be cut */
                    span_part(P, h, j0, j1, j0 * B < a ? (int)(a - j0 * B) : 0, q, m, l, o, G, D);
                else if (j0 >= 0) int_part(P, h, j0, j1, a, b, q, m, l, o, G, D, J->amx);
            } else {
                const long t0 = a + (g0 > c ? g0 - c : 0), t1 = a + (g1 - c < nv ? g1 - c : nv);
                switch (P->kind) {
                case F32: plain_part(P, h, t0, t1, q, m, l, o, F32, G, D); break;
                case BF16:
#ifdef __AVX512BF16__
                    if (J->q_bf16 && D % 32 == 0) { plain_bf16(P, h, t0, t1, q, m, l, o, G, D, J->amx); break; }
#endif
                    plain_part(P, h, t0, t1, q, m, l, o, BF16, G, D); break;
                default: plain_part(P, h, t0, t1, q, m, l, o, F16, G, D); break;
                }
            }
        }
        c += nv;
    }
}

/* specialised for the common shapes (constants let gcc unroll and vectorise over D) */
static void task(const Job *J, int id) {
    const int p = id % J->splits, h = (id / J->splits) % J->n_kv, s = id / J->splits / J->n_kv;
    const int G = J->g, D = J->d;
    float *m = J->m + (long)id * G, *l = J->l + (long)id * G, *o = J->o + (long)id * G * D;
#define G_CASES(DI) switch (G) { \
    case 1: task_body(J, s, h, p, m, l, o, 1, DI); return; \
    case 2: task_body(J, s, h, p, m, l, o, 2, DI); return; \
    case 3: task_body(J, s, h, p, m, l, o, 3, DI); return; \
    case 4: task_body(J, s, h, p, m, l, o, 4, DI); return; \
    case 8: task_body(J, s, h, p, m, l, o, 8, DI); return; }
    if (D == 64) G_CASES(64)
    if (D == 128) G_CASES(128)
#undef G_CASES
    task_body(J, s, h, p, m, l, o, G, D);
}

static int part_ok(const PartDesc *P, int d) {
    if (P->kind >= F32 && P->kind <= F16) return 1;
    if (P->kind == SPAN) return P->k && P->v && P->block > 0 && P->n % P->block == 0;
    if (P->kind != INT) return 0;
    const long b = P->block, g = P->group;
    return (P->bits == 2 || P->bits == 4 || P->bits == 8) && b > 0 && b <= MAXB && b % 16 == 0
        && P->n % b == 0 && (d * P->bits / 8) % 16 == 0 && g > 0 && g % 16 == 0 && d % g == 0;
}

/* out (S, Hq, D): each sequence's attention output; lse (S, Hq), when not NULL: the log-sum-exp
 * of each row's scores, so the output merges with pieces over other keys (a codec's own
 * kernel). Returns 0, or -1 when a size or a part is outside what this kernel handles (the
 * caller falls back; nothing is written then). */
int kvtier_batched_decode(const float *q, int n_seq, int n_kv, int g, int d,
                          const PartDesc *parts, const int64_t *seq_parts,
                          const int64_t *q_pos, const int64_t *lo, float *out, int threads, int q_bf16,
                          float *lse) {
    if (n_seq < 1 || n_kv < 1 || g < 1 || g > MAXR || d < 16 || d > MAXD || d % 16) return -1;
    long longest = 0;
    for (int s = 0; s < n_seq; s++) {
        long total = 0;
        for (long i = seq_parts[s]; i < seq_parts[s + 1]; i++) {
            if (!part_ok(&parts[i], d)) return -1;
            if (parts[i].kind == SPAN && parts[i].start + parts[i].n - 1 > q_pos[s])
                return -1;  /* a codec's kernel masks no future token (a window's cut: its first block's head) */
            total += parts[i].n;
        }
        longest = total > longest ? total : longest;
    }
    if (threads < 1) threads = 1;
    /* few (sequence, head) pairs: cut each sequence's tokens so every thread has work, but no
     * split shorter than a few blocks (its merge and its share of a block cost more) */
    const int pairs = n_seq * n_kv;
    int splits = pairs >= 2 * threads ? 1 : (2 * threads + pairs - 1) / pairs;
    const long most = longest / 256 > 1 ? longest / 256 : 1;
    splits = splits < most ? splits : (int)most;
    Job J = {q, parts, seq_parts, q_pos, lo, n_seq, n_kv, g, d, splits, q_bf16, 0, NULL, NULL, NULL};
#ifdef KVT_AMX
    J.amx = q_bf16 && d % 32 == 0 && g <= 16 && amx_permitted();
#endif
    const long n_tasks = (long)pairs * splits;
    J.m = malloc(sizeof(float) * n_tasks * g);
    J.l = malloc(sizeof(float) * n_tasks * g);
    J.o = malloc(sizeof(float) * n_tasks * g * d);
    if (!J.m || !J.l || !J.o) { free(J.m); free(J.l); free(J.o); return -1; }
    /* torch's own libgomp in a torch process: the kernel runs on torch's thread pool */
    #pragma omp parallel num_threads(threads)
    {
#ifdef KVT_AMX
        TileConfig saved;
        if (J.amx) amx_begin(&saved, 8, NULL);  /* plain_bf16: 0-2; int_blocks_amx: all */
#endif
        #pragma omp for schedule(dynamic, 1)
        for (long id = 0; id < n_tasks; id++) task(&J, (int)id);
#ifdef KVT_AMX
        if (J.amx) amx_end(&saved);
#endif
        #pragma omp for schedule(static)
        for (long pair = 0; pair < pairs; pair++)  /* merge the splits (log-sum-exp), normalise */
            for (int r = 0; r < g; r++) {
                const long base = pair * splits;
                float top = -FLT_MAX, sum = 0.f;
                for (int p = 0; p < splits; p++) {
                    const float mp = J.m[(base + p) * g + r];
                    top = J.l[(base + p) * g + r] > 0.f && mp > top ? mp : top;
                }
                float *dst = out + (pair * g + r) * d;  /* (s, h) pairs in order: rows h*G + r */
                memset(dst, 0, sizeof(float) * d);
                for (int p = 0; p < splits; p++) {
                    const long id = base + p;
                    if (J.l[id * g + r] <= 0.f) continue;  /* a split that saw no key */
                    const float w = expf(J.m[id * g + r] - top);
                    sum += w * J.l[id * g + r];
                    const float *op = J.o + (id * g + r) * d;
                    for (int c = 0; c < d; c++) dst[c] += w * op[c];
                }
                const float inv = sum > 0.f ? 1.f / sum : 0.f;
                for (int c = 0; c < d; c++) dst[c] *= inv;
                if (lse) lse[pair * g + r] = sum > 0.f ? top + logf(sum) : -FLT_MAX;  /* no key seen: weight 0 */
            }
    }
    free(J.m); free(J.l); free(J.o);
    return 0;
}

/* frees a job a codec's kvtier_*_job made */
void kvtier_job_free(void *job) { free(job); }
