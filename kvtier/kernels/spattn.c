/* Decode attention on the `sparse` codec's blocks (Mustafar: per-token magnitude pruning,
 * a bitmap plus the kept values), in fp32.
 *
 * One call covers one run of consecutive blocks of one layer, all KV heads. Per KV head and
 * block of B tokens, keys and values alike:
 *   map  B rows of D/8 bytes, a bitmap of the kept channels packed in planes
 *        (kvtier.kv.codecs.packing: channel i * D/8 + j is bit i of byte j);
 *   val  B rows of `nnz` kept values in channel order, fp16 or bf16.
 * Each row's bitmap is walked into the kept channels' indices (planes in order give the
 * channels in order); a score is the query gathered at those channels times the kept key
 * values, and the kept value values are added into the output at theirs: the dense rows are
 * never formed. For the R query rows of a head (pre-scaled) it returns the softmax pieces m, l,
 * o that kvtier.attention.blockwise.merge combines; work is split over (head, run of blocks)
 * tasks. kvtier.kv.codecs.sparse.Sparse.attend_torch is the reference this is tested against.
 */
#include "spans.h"

enum { KM, KV, VM, VV, SFIELDS };  /* the fields, in Python's order */

typedef struct {
    const float *q; int n_kv, rows, d, nnz, bf16, block, n_blocks;
    const void *const *p; const long *hs;  /* each field's base and head stride (elements) */
} SJob;

#define SAT(J, T, f, h, b, per) ((const T *)(J)->p[f] + (h) * (J)->hs[f] + (long)(b) * (per))

/* the kept channels of one row, in order (branch-free: every channel written, kept ones kept) */
RINLINE int channels_of(const uint8_t *restrict map, int *restrict idx, const int D) {
    const int m = D / 8;
    int n = 0;
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < m; j++) {
            idx[n] = i * m + j;
            n += (map[j] >> i) & 1;
        }
    return n;
}

/* n stored values (fp16 or bf16 bits) as fp32 */
RINLINE void values_of(const uint16_t *restrict raw, float *restrict out, const int n, const int bf16) {
    if (bf16) {
        for (int i = 0; i < n; i++) {
            const uint32_t bits = (uint32_t)raw[i] << 16;
            memcpy(out + i, &bits, sizeof bits);
        }
    } else {
        const _Float16 *half = (const _Float16 *)raw;
        for (int i = 0; i < n; i++) out[i] = (float)half[i];
    }
}

/* one head's pieces over blocks [b0, b1); R, D, B and nnz are compile-time constants in the
 * specialised calls of span() */
RINLINE void span_of(const SJob *J, int h, int b0, int b1, float *m_out, float *l_out, float *o,
                     const int R, const int D, const int B, const int N) {
    const float *q = J->q + (long)h * R * D;
    int idx[RMAXD + 1] = {0};  /* always channels of the head, whatever a row's bitmap holds */
    float val[RMAXD], s[RMAXR * RMAXB], mr[RMAXR], lr[RMAXR];
    for (int r = 0; r < R; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(o, 0, sizeof(float) * R * D);
    for (int b = b0; b < b1; b++) {
        const uint8_t *km = SAT(J, uint8_t, KM, h, b, B * (D / 8));
        const uint16_t *kv = SAT(J, uint16_t, KV, h, b, B * N);
        for (int t = 0; t < B; t++) {
            channels_of(km + (long)t * (D / 8), idx, D);
            values_of(kv + (long)t * N, val, N, J->bf16);
            for (int r = 0; r < R; r++) {
                const float *qr = q + r * D;
                float acc = 0.f;
                for (int i = 0; i < N; i++) acc += qr[idx[i]] * val[i];
                s[r * B + t] = acc;
            }
        }
        online_softmax(s, mr, lr, o, R, D, B);
        const uint8_t *vm = SAT(J, uint8_t, VM, h, b, B * (D / 8));
        const uint16_t *vv = SAT(J, uint16_t, VV, h, b, B * N);
        for (int t = 0; t < B; t++) {
            channels_of(vm + (long)t * (D / 8), idx, D);
            values_of(vv + (long)t * N, val, N, J->bf16);
            for (int r = 0; r < R; r++) {
                const float p = s[r * B + t];
                float *orow = o + r * D;
                for (int i = 0; i < N; i++) orow[idx[i]] += p * val[i];
            }
        }
    }
    for (int r = 0; r < R; r++) { m_out[r] = mr[r]; l_out[r] = lr[r]; }
}

static void span(const void *job, int h, int b0, int b1, float *m, float *l, float *o) {
    const SJob *J = job;
    const int R = J->rows, D = J->d, B = J->block, N = J->nnz;
#define SHAPE(r, d, bb, n) if (R == r && D == d && B == bb && N == n) { span_of(J, h, b0, b1, m, l, o, r, d, bb, n); return; }
    SHAPE(3, 64, 64, 32)    /* SmolLM2 at the default ratio 0.5: 9 query heads over 3 KV heads */
    SHAPE(4, 256, 64, 128)  /* Gemma 3: 4 query heads over 1 KV head */
#undef SHAPE
    span_of(J, h, b0, b1, m, l, o, R, D, B, N);
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles (the caller falls back).
 * Every row's bitmap must hold exactly nnz channels (the codec's invariant). */
int kvtier_sparse_attend(const float *q, int n_kv, int rows, int d, int nnz, int bf16, int block, int n_blocks,
                         const void *const *ptrs, const long *strides, float *m, float *l, float *o, int threads) {
    if (d > RMAXD || d % 8 || rows > RMAXR || block > RMAXB || nnz < 1 || nnz > d || n_blocks < 1)
        return 1;
    SJob J = {q, n_kv, rows, d, nnz, bf16, block, n_blocks, ptrs, strides};
    return run_spans(&J, span, n_kv, rows, d, n_blocks, m, l, o, threads);
}
