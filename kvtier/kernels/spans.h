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

/* scores s[r * B + t] of the R query rows q (R x D) against a decoded block kb (B x D) */
RINLINE void block_scores(const float *restrict kb, const float *restrict q, float *restrict s,
                          const int R, const int D, const int B) {
    for (int t = 0; t < B; t++) {
        const float *row = kb + t * D;
        for (int r = 0; r < R; r++) {
            const float *qr = q + r * D;
            float acc = 0.f;
            for (int c = 0; c < D; c++) acc += qr[c] * row[c];
            s[r * B + t] = acc;
        }
    }
}

/* keys kb (B x D, before RoPE) rotated by the unit cos/sin rows rp ((B, 2, D), rotate-half
 * layout) and scored against the R pre-scaled query rows q: s[r * B + t] */
RINLINE void rope_scores(const float *kb, const float *rp, const float *q, float *s,
                         const int R, const int D, const int B) {
    const int half = D / 2;
    for (int t = 0; t < B; t++) {
        const float *row = kb + t * D, *cs = rp + (long)t * 2 * D, *sn = cs + D;
        float rot[RMAXD];
        for (int c = 0; c < half; c++) {
            rot[c] = row[c] * cs[c] - row[c + half] * sn[c];
            rot[c + half] = row[c + half] * cs[c + half] + row[c] * sn[c + half];
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
        for (int t = 0; t < B; t++) { s[r * B + t] = expf(s[r * B + t] - top); sum += s[r * B + t]; }
        lr[r] += sum;
    }
}

/* o (R x D) += weights s (R x B) times the decoded values vb (B x D) */
RINLINE void weighted_sum(float *restrict o, const float *restrict s, const float *restrict vb,
                          const int R, const int D, const int B) {
    for (int r = 0; r < R; r++) {
        float *orow = o + (long)r * D;
        for (int t = 0; t < B; t++) {
            const float p = s[r * B + t], *row = vb + (long)t * D;
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
        span(job, q + (long)h * rows * d, h, b0, b1, tm + (long)task * rows, tl + (long)task * rows, to + (long)task * rows * d);
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
