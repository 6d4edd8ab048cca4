/* What the attention kernels on codes share: the in-register lookup of a row of packed codes,
 * the one-byte log scales, the rotation and scoring of a block of keys stored before RoPE
 * (nuqattn.c, vqattn.c, rkvattn.c), the online softmax over a block, and the driver that
 * splits a run of blocks over threads and merges the pieces. Each kernel supplies how a block
 * is decoded and scored (its span function). */
#ifndef KVTIER_SPANS_H
#define KVTIER_SPANS_H
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "spanfn.h"
#include "vexp.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define RMAXD 256
#define RMAXR 32
#define RMAXB 128
#define RINLINE static inline __attribute__((always_inline))

typedef float nvf __attribute__((vector_size(64)));     /* 16 floats */
typedef int32_t nvi __attribute__((vector_size(64)));
typedef uint8_t nvb __attribute__((vector_size(16)));

/* one row of D codes -> lut[code]: 16 codes at a time through a 16-entry in-register table
 * (one permute on AVX-512) when a plane is a multiple of 16 bytes, else one at a time */
static inline void unpack_row(const uint8_t *row, const float *lut, nvf table, float *out, int D, int bits) {
    const int p = 8 / bits, m = D / p, mask = (1 << bits) - 1;
    if (m % 16 == 0) {
        for (int j = 0; j < m; j += 16) {
#ifdef __AVX512F__  /* gcc 12's generic widening is 16 scalar inserts */
            const nvi x = (nvi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + j)));
#else
            nvb b;
            memcpy(&b, row + j, sizeof b);
            const nvi x = __builtin_convertvector(b, nvi);
#endif
            for (int i = 0; i < p; i++) {
                const nvf v = __builtin_shuffle(table, table, (x >> (i * bits)) & mask);
                memcpy(out + i * m + j, &v, sizeof v);
            }
        }
        return;
    }
    for (int i = 0; i < p; i++)
        for (int j = 0; j < m; j++) out[i * m + j] = lut[(row[j] >> (i * bits)) & mask];
}

/* a scale code's value, 2^(c/12 - 12); code 0 is exactly zero (a group or vector of zeros) */
static float SCALE[256];

static void scale_table(void) {
    if (SCALE[255] != 0.f) return;
    for (int c = 1; c < 256; c++) SCALE[c] = exp2f(c / 12.0f - 12.0f);
}

/* out[t] = the sum of the 16 lanes of v[t], for 16 vectors at once: a tree of two-vector
 * shuffles that halves the partial sums per token at each level (15 shuffle pairs and adds
 * instead of 16 horizontal reductions) */
RINLINE nvf sum16(const nvf *v) {
    static const nvi a1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    static const nvi b1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    static const nvi a2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    static const nvi b2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    static const nvi a3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    static const nvi b3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    static const nvi a4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    static const nvi b4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    nvf w[8], z[4], x[2];
    for (int i = 0; i < 8; i++)  /* 8 partials each of tokens 2i, 2i+1 */
        w[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], a1) + __builtin_shuffle(v[2 * i], v[2 * i + 1], b1);
    for (int i = 0; i < 4; i++)  /* 4 partials each of tokens 4i .. 4i+3 */
        z[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], a2) + __builtin_shuffle(w[2 * i], w[2 * i + 1], b2);
    for (int i = 0; i < 2; i++)  /* 2 partials each of tokens 8i .. 8i+7 */
        x[i] = __builtin_shuffle(z[2 * i], z[2 * i + 1], a3) + __builtin_shuffle(z[2 * i], z[2 * i + 1], b3);
    return __builtin_shuffle(x[0], x[1], a4) + __builtin_shuffle(x[0], x[1], b4);
}

RINLINE nvf loadv(const float *p) { nvf v; memcpy(&v, p, sizeof v); return v; }
RINLINE void storev(float *p, const nvf v) { memcpy(p, &v, sizeof v); }

/* scores s[r * B + t] of the R query rows q (R x D) against a decoded block kb (B x D) */
RINLINE void block_scores(const float *restrict kb, const float *restrict q, float *restrict s,
                          const int R, const int D, const int B) {
    int t0 = 0;
    if (D % 16 == 0 && R <= RMAXR)  /* 16 tokens at a time, each row's dot products summed across lanes at once */
        for (; t0 + 16 <= B; t0 += 16) {
            nvf part[RMAXR][16];
            for (int tt = 0; tt < 16; tt++) {
                const float *row = kb + (t0 + tt) * D;
                for (int r = 0; r < R; r++) {
                    nvf acc = loadv(q + r * D) * loadv(row);
                    for (int c = 16; c < D; c += 16) acc += loadv(q + r * D + c) * loadv(row + c);
                    part[r][tt] = acc;
                }
            }
            for (int r = 0; r < R; r++) storev(s + r * B + t0, sum16(part[r]));
        }
    for (int t = t0; t < B; t++) {
        const float *row = kb + t * D;
        for (int r = 0; r < R; r++) {
            const float *qr = q + r * D;
            float acc = 0.f;
            for (int c = 0; c < D; c++) acc += qr[c] * row[c];
            s[r * B + t] = acc;
        }
    }
}

/* RoPE inside a block without reading a row per token. A block's tokens sit at consecutive
 * positions t0 .. t0+B-1, so token j's angles are t0's plus offset j's:
 *     cos(a + b) = cos a cos b - sin a sin b,   sin(a + b) = sin a cos b + cos a sin b.
 * rope_offsets takes the unit rows of offsets 0..B-1 (off: B x 2 x D/2, cos then sin; the
 * rotate-half layout repeats each half) from a run's first block, e^{i theta j} = e^{i theta
 * (t0 + j)} e^{-i theta t0}, and checks every block (n blocks of each of n_kv heads, rows hs
 * apart per head): its last row must be its first turned by offset B-1 (a position skipped
 * or repeated moves the fastest pair, one radian per position, by far more than the table's
 * fp32 rounding). It returns 0, or 1 when a block's positions are not consecutive (the caller
 * falls back), so a kernel reads one row per block instead of B (at 8K, 4 MB per layer and
 * step in SmolLM2's shape, 16 MB in Gemma 3's: more than the codes). The rows so made differ
 * from the table's by its rounding of each position's angle in fp32 (~1e-4 at position 2000). */
static int rope_offsets(const float *rp, const long hs, const int n_kv, const int n, const int B, const int D,
                        float *off) {
    const int half = D / 2;
    const float *c0 = rp, *s0 = rp + D;
    for (int j = 0; j < B; j++) {
        const float *cj = rp + (long)j * 2 * D, *sj = cj + D;
        for (int c = 0; c < half; c++) {
            off[j * D + c] = cj[c] * c0[c] + sj[c] * s0[c];
            off[j * D + half + c] = sj[c] * c0[c] - cj[c] * s0[c];
        }
    }
    const float *ce = off + (long)(B - 1) * D, *se = ce + half;
    for (int h = 0; h < n_kv; h++)
        for (int b = 0; b < n; b++) {
            const float *r0 = rp + h * hs + (long)b * B * 2 * D, *r1 = r0 + (long)(B - 1) * 2 * D;
            for (int c = 0; c < half; c++) {
                const float cs = r0[c] * ce[c] - r0[D + c] * se[c], sn = r0[D + c] * ce[c] + r0[c] * se[c];
                /* the table's own fp32 angles drift by up to ~8e-3 rad at position 131072; a
                 * skipped position moves the fastest pair (0.1-1 rad per position) by more */
                if (fabsf(cs - r1[c]) > 0.05f || fabsf(sn - r1[D + c]) > 0.05f) return 1;
            }
        }
    return 0;
}

/* cos and sin (D/2 each) of token j of a block whose first row is r0 ((2, D)) */
RINLINE void rope_at(const float *restrict r0, const float *restrict off, const int j, const int D,
                     float *restrict cs, float *restrict sn) {
    const int half = D / 2;
    const float *cj = off + (long)j * D, *sj = cj + half;
    for (int c = 0; c < half; c++) {
        cs[c] = r0[c] * cj[c] - r0[D + c] * sj[c];
        sn[c] = r0[D + c] * cj[c] + r0[c] * sj[c];
    }
}

/* keys kb (B x D, before RoPE) of a block whose first row is r0 ((2, D), rotate-half layout),
 * rotated at their positions (rope_at) and scored against the R pre-scaled query rows q:
 * s[r * B + t] */
RINLINE void rope_scores(const float *kb, const float *r0, const float *off, const float *q, float *s,
                         const int R, const int D, const int B) {
    const int half = D / 2;
    int t0 = 0;
    if (D % 32 == 0 && R <= RMAXR)  /* 16 tokens at a time, as block_scores */
        for (; t0 + 16 <= B; t0 += 16) {
            nvf part[RMAXR][16];
            for (int tt = 0; tt < 16; tt++) {
                const float *row = kb + (t0 + tt) * D;
                float cs[RMAXD / 2], sn[RMAXD / 2];
                rope_at(r0, off, t0 + tt, D, cs, sn);
                nvf rot[RMAXD / 16];
                for (int c = 0; c < half; c += 16) {
                    const nvf lo = loadv(row + c), hi = loadv(row + c + half), cv = loadv(cs + c), sv = loadv(sn + c);
                    rot[c / 16] = lo * cv - hi * sv;
                    rot[(c + half) / 16] = hi * cv + lo * sv;
                }
                for (int r = 0; r < R; r++) {
                    nvf acc = loadv(q + r * D) * rot[0];
                    for (int c = 16; c < D; c += 16) acc += loadv(q + r * D + c) * rot[c / 16];
                    part[r][tt] = acc;
                }
            }
            for (int r = 0; r < R; r++) storev(s + r * B + t0, sum16(part[r]));
        }
    for (int t = t0; t < B; t++) {
        const float *row = kb + t * D;
        float rot[RMAXD], cs[RMAXD / 2], sn[RMAXD / 2];
        rope_at(r0, off, t, D, cs, sn);
        for (int c = 0; c < half; c++) {
            rot[c] = row[c] * cs[c] - row[c + half] * sn[c];
            rot[c + half] = row[c + half] * cs[c] + row[c] * sn[c];
        }
        for (int r = 0; r < R; r++) {
            const float *qr = q + r * D;
            float acc = 0.f;
            for (int c = 0; c < D; c++) acc += qr[c] * rot[c];
            s[r * B + t] = acc;
        }
    }
}

/* scores s (R x B) -> weights exp(s - max) under the running max mr and sum lr; the output o
 * (R x D) is rescaled when the max grows */
RINLINE void online_softmax(float *s, float *mr, float *lr, float *o, const int R, const int D, const int B) {
    for (int r = 0; r < R; r++) {
        float top = mr[r];
        for (int t = 0; t < B; t++) top = s[r * B + t] > top ? s[r * B + t] : top;
        if (top > mr[r]) {
            const float w = expf(mr[r] - top);
            lr[r] *= w;
            for (int c = 0; c < D; c++) o[r * D + c] *= w;
            mr[r] = top;
        }
        float sum = 0.f;
        int t = 0;
#ifdef __AVX512F__
        nvf acc = {0};
        for (; t + 16 <= B; t += 16) {
            const nvf e = (nvf)exp512(_mm512_sub_ps(_mm512_loadu_ps(s + r * B + t), _mm512_set1_ps(top)));
            storev(s + r * B + t, e);
            acc += e;
        }
        sum = _mm512_reduce_add_ps((__m512)acc);
#endif
        for (; t < B; t++) { s[r * B + t] = expf(s[r * B + t] - top); sum += s[r * B + t]; }
        lr[r] += sum;
    }
}

/* online_softmax of a block whose first `skip` tokens a sliding window cuts: they get weight 0 */
RINLINE void online_softmax_from(float *s, float *mr, float *lr, float *o, const int R, const int D, const int B,
                                 const int skip) {
    for (int r = 0; r < R; r++)
        for (int t = 0; t < skip; t++) s[r * B + t] = -FLT_MAX;
    online_softmax(s, mr, lr, o, R, D, B);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < skip; t++) {  /* exp512 clamps at exp(-87), not 0 */
            lr[r] -= s[r * B + t];
            s[r * B + t] = 0.f;
        }
}

/* o (R x D) += weights s (R x B) times the decoded values vb (B rows of D, ld apart): 32 channels of up to 12
 * rows held in registers while the tokens stream past (each value vector loaded once per 12
 * rows, not once per row) */
RINLINE void weighted_sum(float *restrict o, const float *restrict s, const float *restrict vb,
                          const int R, const int D, const int B, const long ld) {
    int c0 = 0;
    if (D % 16 == 0)
        for (; c0 < D; c0 += 32) {
            const int wide = c0 + 32 <= D;
            for (int r0 = 0; r0 < R; r0 += 12) {
                const int nr = R - r0 < 12 ? R - r0 : 12;
                nvf a[12][2];
                for (int r = 0; r < nr; r++) {
                    a[r][0] = loadv(o + (long)(r0 + r) * D + c0);
                    if (wide) a[r][1] = loadv(o + (long)(r0 + r) * D + c0 + 16);
                }
                for (int t = 0; t < B; t++) {
                    const nvf v0 = loadv(vb + t * ld + c0), v1 = wide ? loadv(vb + t * ld + c0 + 16) : v0;
                    for (int r = 0; r < nr; r++) {
                        const float p = s[(r0 + r) * B + t];
                        a[r][0] += p * v0;
                        if (wide) a[r][1] += p * v1;
                    }
                }
                for (int r = 0; r < nr; r++) {
                    storev(o + (long)(r0 + r) * D + c0, a[r][0]);
                    if (wide) storev(o + (long)(r0 + r) * D + c0 + 16, a[r][1]);
                }
            }
        }
    if (c0 >= D) return;
    for (int r = 0; r < R; r++) {
        float *orow = o + (long)r * D;
        for (int t = 0; t < B; t++) {
            const float p = s[r * B + t], *row = vb + t * ld;
            for (int c = 0; c < D; c++) orow[c] += p * row[c];
        }
    }
}


/* A heap copy of the job J (size bytes) for batched.c's SPAN parts, freed there by
 * kvtier_job_free; NULL when making it failed or memory ran out. */
static void *job_copy(const void *J, size_t size, int failed) {
    void *out = failed ? NULL : malloc(size);
    if (out) memcpy(out, J, size);
    return out;
}

/* The query q is (n_kv, rows, d). Splits n_blocks of each of n_kv heads into the fewest runs that give every thread the same
 * number of tasks, runs them in parallel and merges each head's pieces (log-sum-exp).
 * Returns 0, or 1 when memory runs out. */
static int run_spans(const void *job, span_fn span, const float *q, int n_kv, int rows, int d, int n_blocks,
                     float *m, float *l, float *o, int threads) {
    int splits = 1;
    while ((n_kv * splits < threads || (n_kv * splits) % threads) && splits < n_blocks && splits < 4 * threads)
        splits++;
    const int tasks = n_kv * splits;
    float *tm = malloc(sizeof(float) * tasks * rows), *tl = malloc(sizeof(float) * tasks * rows);
    float *to = malloc(sizeof(float) * tasks * rows * d);
    if (!tm || !tl || !to) { free(tm); free(tl); free(to); return 1; }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int task = 0; task < tasks; task++) {
        const int h = task / splits, sp = task % splits;
        const int b0 = (long)n_blocks * sp / splits, b1 = (long)n_blocks * (sp + 1) / splits;
        span(job, q + (long)h * rows * d, h, b0, b1, 0, tm + (long)task * rows, tl + (long)task * rows, to + (long)task * rows * d);
    }
    for (int h = 0; h < n_kv; h++)
        for (int r = 0; r < rows; r++) {
            float top = -FLT_MAX;
            for (int sp = 0; sp < splits; sp++) {
                const float x = tm[(long)(h * splits + sp) * rows + r];
                top = x > top ? x : top;
            }
            float sum = 0.f, *out = o + ((long)h * rows + r) * d;
            memset(out, 0, sizeof(float) * d);
            for (int sp = 0; sp < splits; sp++) {
                const long t = (long)(h * splits + sp) * rows + r;
                const float w = expf(tm[t] - top);
                sum += tl[t] * w;
                for (int c = 0; c < d; c++) out[c] += to[t * d + c] * w;
            }
            m[h * rows + r] = top;
            l[h * rows + r] = sum;
        }
    free(tm); free(tl); free(to);
    return 0;
}
#endif
