/* Decode attention on packed integer KV blocks (the `int` codec's layout), in fp32.
 *
 * One call covers one run of consecutive blocks of one layer, all KV heads. Per KV head:
 *   keys    a block of B tokens is stored channel-major: byte row j (B bytes, one per token)
 *           holds channel j + i*m of every token in plane i (bits i*bits .. ), m = D*bits/8;
 *           one fp16 scale and zero per channel per block (KIVI's per-channel keys);
 *   values  token-major: a token's m bytes hold its D codes in planes the same way; one fp16
 *           scale and zero per token per `group` channels.
 * Channel-major keys let the scores of all B tokens of a block accumulate in vector registers
 * (no horizontal sums): s[r, :] += (q[r, c] * scale[c]) * code[c, :].
 * For the R query rows of a head (pre-scaled) it returns the softmax pieces
 *   m[h, r] = max_t s[r, t],  l[h, r] = sum_t exp(s - m),  o[h, r, :] = sum_t exp(s - m) v[t, :]
 * that kvtier.attention.blockwise.merge combines exactly with the other parts. Work is split
 * over (head, run of blocks) tasks on `threads` OpenMP threads and merged here by log-sum-exp.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "intblock.h"

typedef struct {
    const float *q; int n_kv, rows, d, bits, group, block, n_blocks;
    const uint8_t *k, *v; const _Float16 *ks, *kz, *vs, *vz;
    long k_hs, ks_hs, v_hs, vs_hs;         /* head strides, in elements */
    int splits;                           /* block runs per head */
    float *m, *l, *o;                     /* per task: rows, rows, rows*d */
    int n_tasks;
} Job;

INLINE void run(Job *J, int h, int b0, int b1, float *m, float *l, float *o,
                const int R, const int BITS, const int D, const int B) {
    const int n = (b1 - b0) * B, mb = D * BITS / 8, ng = D / J->group;
    const float *q = J->q + (long)h * R * D;
    float *s = malloc(sizeof(float) * R * n);
    float qs[MAXR * MAXD], bias[MAXR];
    for (int b = b0; b < b1; b++) {  /* per-channel key scales fold into the query */
        const _Float16 *ks = J->ks + h * J->ks_hs + (long)b * D, *kz = J->kz + h * J->ks_hs + (long)b * D;
        fold_scales(q, ks, kz, qs, bias, R, D);
        key_block(J->k + h * J->k_hs + (long)b * B * mb, qs, bias, s + (b - b0) * B, n, R, BITS, D, B);
    }
    for (int r = 0; r < R; r++) {  /* softmax pieces */
        float top = -FLT_MAX, sum = 0.f, *sr = s + (long)r * n;
        for (int t = 0; t < n; t++) top = sr[t] > top ? sr[t] : top;
        for (int t = 0; t < n; t++) { sr[t] = expf(sr[t] - top); sum += sr[t]; }
        m[r] = top; l[r] = sum;
    }
    value_rows(J->v + h * J->v_hs + (long)b0 * B * mb, J->vs + h * J->vs_hs + (long)b0 * B * ng,
               J->vz + h * J->vs_hs + (long)b0 * B * ng, s, n, n, J->group, o, R, BITS, D);
    free(s);
}

/* specialised for the common shapes (constants let gcc unroll and keep sums in registers) */
#define R_CASES(BI, DI) switch (R) { \
    case 1: run(J, h, b0, b1, m, l, o, 1, BI, DI, 64); return; \
    case 2: run(J, h, b0, b1, m, l, o, 2, BI, DI, 64); return; \
    case 3: run(J, h, b0, b1, m, l, o, 3, BI, DI, 64); return; \
    case 4: run(J, h, b0, b1, m, l, o, 4, BI, DI, 64); return; \
    case 6: run(J, h, b0, b1, m, l, o, 6, BI, DI, 64); return; \
    case 8: run(J, h, b0, b1, m, l, o, 8, BI, DI, 64); return; }
#define D_CASES(BI) if (J->block == 64 && J->d == 64) R_CASES(BI, 64) \
    if (J->block == 64 && J->d == 128) R_CASES(BI, 128)

/* one head's blocks [b0, b1): its softmax pieces */
static void span(Job *J, int h, int b0, int b1, float *m, float *l, float *o) {
    const int R = J->rows;
    switch (J->bits) {
    case 2: D_CASES(2) run(J, h, b0, b1, m, l, o, R, 2, J->d, J->block); return;
    case 4: D_CASES(4) run(J, h, b0, b1, m, l, o, R, 4, J->d, J->block); return;
    default: D_CASES(8) run(J, h, b0, b1, m, l, o, R, 8, J->d, J->block); return;
    }
}

static void task(Job *J, int id) {
    const int h = id / J->splits, part = id % J->splits, R = J->rows;
    const int b0 = (int)((long)J->n_blocks * part / J->splits);
    const int b1 = (int)((long)J->n_blocks * (part + 1) / J->splits);
    float *m = J->m + (long)id * R, *l = J->l + (long)id * R, *o = J->o + (long)id * R * J->d;
    if (b1 == b0) {
        for (int r = 0; r < R; r++) { m[r] = -FLT_MAX; l[r] = 0.f; }
        memset(o, 0, sizeof(float) * R * J->d);
        return;
    }
    span(J, h, b0, b1, m, l, o);
}

/* The softmax pieces m, l (rows) and o (rows * d) of one head's blocks [b0, b1 > b0), on the
 * calling thread: pointers are that head's, sizes as kvtier_int_attend takes them (checked by
 * the caller). batched.c calls it for the blocks its queries see whole. */
void kvtier_int_span(const float *q, int rows, int d, int bits, int group, int block, int b0, int b1,
                     const uint8_t *k, const _Float16 *ks, const _Float16 *kz,
                     const uint8_t *v, const _Float16 *vs, const _Float16 *vz,
                     float *m, float *l, float *o) {
    Job J = {q, 1, rows, d, bits, group, block, b1, k, v, ks, kz, vs, vz, 0, 0, 0, 0, 1, m, l, o, 1};
    span(&J, 0, b0, b1, m, l, o);
}

/* Returns 0, or -1 when a size is outside what this kernel handles (the caller falls back). */
int kvtier_int_attend(const float *q, int n_kv, int rows, int d, int bits, int group, int block,
                      int n_blocks, const uint8_t *k, const _Float16 *ks, const _Float16 *kz,
                      const uint8_t *v, const _Float16 *vs, const _Float16 *vz,
                      long k_hs, long ks_hs, long v_hs, long vs_hs,
                      float *out_m, float *out_l, float *out_o, int threads) {
    if ((bits != 2 && bits != 4 && bits != 8) || d > MAXD || rows > MAXR || block > MAXB
        || block % 16 || (d * bits / 8) % 16 || group % 16 || d % group)
        return -1;
    if (threads < 1) threads = 1;
    /* every head cut into `threads` runs: the tasks divide evenly over the threads */
    int splits = threads < n_blocks ? threads : n_blocks;
    if (splits < 1) splits = 1;
    Job J = {q, n_kv, rows, d, bits, group, block, n_blocks, k, v, ks, kz, vs, vz,
             k_hs, ks_hs, v_hs, vs_hs, splits, NULL, NULL, NULL, n_kv * splits};
    J.m = malloc(sizeof(float) * J.n_tasks * rows);
    J.l = malloc(sizeof(float) * J.n_tasks * rows);
    J.o = malloc(sizeof(float) * J.n_tasks * rows * d);
    /* OpenMP: inside a torch process this is torch's own libgomp (same soname, loaded
     * first), so the kernel runs on torch's warm thread pool instead of competing with it */
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int id = 0; id < J.n_tasks; id++) task(&J, id);
    for (int h = 0; h < n_kv; h++)  /* merge the block runs of each head (log-sum-exp) */
        for (int r = 0; r < rows; r++) {
            float top = -FLT_MAX, sum = 0.f, *o = out_o + ((long)h * rows + r) * d;
            for (int p = 0; p < splits; p++) {
                float mp = J.m[(long)(h * splits + p) * rows + r];
                top = mp > top ? mp : top;
            }
            memset(o, 0, sizeof(float) * d);
            for (int p = 0; p < splits; p++) {
                long id = h * splits + p;
                float w = expf(J.m[id * rows + r] - top);
                sum += w * J.l[id * rows + r];
                const float *op = J.o + (id * rows + r) * d;
                for (int c = 0; c < d; c++) o[c] += w * op[c];
            }
            out_m[h * rows + r] = top; out_l[h * rows + r] = sum;
        }
    free(J.m); free(J.l); free(J.o);
    return 0;
}
