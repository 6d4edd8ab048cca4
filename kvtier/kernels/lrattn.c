/* Decode attention on the `lowrank` codec's blocks (SVDQuant's split: a per-block rank-r fp16
 * part plus an int remainder per token), in fp32.
 *
 * One call covers one run of consecutive blocks of one layer, all KV heads. Per KV head and
 * block of B tokens, keys and values alike:
 *   q       B rows of D codes (2, 4 or 8 bits, packed in planes: kvtier.kv.codecs.packing);
 *   scale, zero   one fp16 pair per token: the remainder is zero + scale * code;
 *   left (B, r), right (r, D)   fp16 factors: the block is remainder + left @ right.
 * The low-rank part is never expanded: a score is scale * (q . code) + zero * sum(q) +
 * left . (right q), with `right q` computed once per block, and the output gains
 * (sum of p * left) @ right once per block. Only the codes are unpacked, into a small buffer.
 * For the R query rows of a head (pre-scaled) it returns the softmax pieces m, l, o that
 * kvtier.attention.blockwise.merge combines; work is split over (head, run of blocks) tasks.
 * kvtier.kv.codecs.lowrank.LowRank.attend_torch is the reference this is tested against.
 */
#include "spans.h"

#define LMAXRANK 16

enum { KQ, KSC, KZ, KL, KR, VQ, VSC, VZ, VL, VR, LFIELDS };  /* the fields, in Python's order */

typedef struct {
    int n_kv, rows, d, bits, rank, block, n_blocks;
    const void *const *p; const long *hs;  /* each field's base and head stride (elements) */
} LJob;

#define LAT(J, T, f, h, b, per) ((const T *)(J)->p[f] + (h) * (J)->hs[f] + (long)(b) * (per))

/* the codes of block b of field f (head h) as floats, B rows of D */
RINLINE void codes_of(const LJob *J, const int f, const int h, const int b, float *restrict out, const nvf table,
                      const int D, const int B, const int bits) {
    static const float ident[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int P = D * bits / 8;
    const uint8_t *codes = LAT(J, uint8_t, f, h, b, B * P);
    for (int t = 0; t < B; t++) {
        if (bits == 8)
            for (int c = 0; c < D; c++) out[t * D + c] = codes[(long)t * P + c];
        else
            unpack_row(codes + (long)t * P, ident, table, out + t * D, D, bits);
    }
}

/* one head's pieces over blocks [b0, b1); R, D, B, bits and rank are compile-time constants in
 * the specialised calls of span() */
RINLINE void span_of(const LJob *J, const float *q, int h, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                     const int R, const int D, const int B, const int bits, const int K) {
    float cb[RMAXB * RMAXD], s[RMAXR * RMAXB], mr[RMAXR], lr[RMAXR];
    float qsum[RMAXR], rq[RMAXR * LMAXRANK], pl[RMAXR * LMAXRANK], right[LMAXRANK * RMAXD];
    for (int r = 0; r < R; r++) {
        mr[r] = -FLT_MAX;
        lr[r] = 0.f;
        float acc = 0.f;
        for (int c = 0; c < D; c++) acc += q[r * D + c];
        qsum[r] = acc;
    }
    memset(o, 0, sizeof(float) * R * D);
    nvf table;
    for (int c = 0; c < 16; c++) table[c] = (float)c;
    for (int b = b0; b < b1; b++) {
        /* keys: right q once per block, then each token's score from its codes and factors */
        const _Float16 *kr = LAT(J, _Float16, KR, h, b, K * D), *kl = LAT(J, _Float16, KL, h, b, B * K);
        const _Float16 *ks = LAT(J, _Float16, KSC, h, b, B), *kz = LAT(J, _Float16, KZ, h, b, B);
        for (int j = 0; j < K * D; j++) right[j] = (float)kr[j];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < K; j++) {
                float acc = 0.f;
                for (int c = 0; c < D; c++) acc += right[j * D + c] * q[r * D + c];
                rq[r * K + j] = acc;
            }
        codes_of(J, KQ, h, b, cb, table, D, B, bits);
        for (int t = 0; t < B; t++) {
            const float *row = cb + t * D, sc = (float)ks[t], z = (float)kz[t];
            for (int r = 0; r < R; r++) {
                const float *qr = q + r * D;
                float acc = 0.f, low = 0.f;
                for (int c = 0; c < D; c++) acc += qr[c] * row[c];
                for (int j = 0; j < K; j++) low += (float)kl[t * K + j] * rq[r * K + j];
                s[r * B + t] = sc * acc + z * qsum[r] + low;
            }
        }
        online_softmax_from(s, mr, lr, o, R, D, B, b == b0 ? skip : 0);
        /* values: the codes under p * scale, the zeros as one constant, the factors once */
        const _Float16 *vr = LAT(J, _Float16, VR, h, b, K * D), *vl = LAT(J, _Float16, VL, h, b, B * K);
        const _Float16 *vs = LAT(J, _Float16, VSC, h, b, B), *vz = LAT(J, _Float16, VZ, h, b, B);
        codes_of(J, VQ, h, b, cb, table, D, B, bits);
        for (int r = 0; r < R; r++) {
            float *orow = o + r * D, zsum = 0.f;
            for (int j = 0; j < K; j++) pl[r * K + j] = 0.f;
            for (int t = 0; t < B; t++) {
                const float p = s[r * B + t], w = p * (float)vs[t], *row = cb + t * D;
                zsum += p * (float)vz[t];
                for (int j = 0; j < K; j++) pl[r * K + j] += p * (float)vl[t * K + j];
                for (int c = 0; c < D; c++) orow[c] += w * row[c];
            }
            for (int c = 0; c < D; c++) orow[c] += zsum;
            for (int j = 0; j < K; j++) {
                const float a = pl[r * K + j];
                for (int c = 0; c < D; c++) orow[c] += a * (float)vr[j * D + c];
            }
        }
    }
    for (int r = 0; r < R; r++) { m_out[r] = mr[r]; l_out[r] = lr[r]; }
}

static void span(const void *job, const float *q, int h, int b0, int b1, int skip, float *m, float *l, float *o) {
    const LJob *J = job;
    const int R = J->rows, D = J->d, B = J->block, bits = J->bits, K = J->rank;
#define SHAPE(r, d, bb, k) \
    if (R == r && D == d && B == bb && bits == k && K == 1) { span_of(J, q, h, b0, b1, skip, m, l, o, r, d, bb, k, 1); return; }
    SHAPE(3, 64, 64, 4) SHAPE(3, 64, 64, 2)     /* SmolLM2: 9 query heads over 3 KV heads */
    SHAPE(4, 256, 64, 4) SHAPE(4, 256, 64, 2)   /* Gemma 3: 4 query heads over 1 KV head */
#undef SHAPE
    span_of(J, q, h, b0, b1, skip, m, l, o, R, D, B, bits, K);
}

/* The job of a run of blocks: 0, or 1 when the sizes are outside what this kernel handles. */
static int job_of(LJob *J, int n_kv, int rows, int d, int bits, int rank, int block, int n_blocks,
                  const void *const *ptrs, const long *strides) {
    if (d > RMAXD || rows > RMAXR || block > RMAXB || (bits != 2 && bits != 4 && bits != 8) || rank < 1
        || rank > LMAXRANK || (d * bits) % 8 || n_blocks < 1)
        return 1;
    *J = (LJob){n_kv, rows, d, bits, rank, block, n_blocks, ptrs, strides};
    return 0;
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles (the caller falls back). */
int kvtier_lowrank_attend(const float *q, int n_kv, int rows, int d, int bits, int rank, int block, int n_blocks,
                          const void *const *ptrs, const long *strides, float *m, float *l, float *o, int threads) {
    LJob J;
    if (job_of(&J, n_kv, rows, d, bits, rank, block, n_blocks, ptrs, strides)) return 1;
    return run_spans(&J, span, q, n_kv, rows, d, n_blocks, m, l, o, threads);
}

/* The same run as a job for batched.c's SPAN parts, or NULL; and its span function. */
void *kvtier_lowrank_job(int n_kv, int rows, int d, int bits, int rank, int block, int n_blocks,
                         const void *const *ptrs, const long *strides) {
    LJob J;
    return job_copy(&J, sizeof J, job_of(&J, n_kv, rows, d, bits, rank, block, n_blocks, ptrs, strides));
}

void *kvtier_lowrank_span(void) { return (void *)span; }
