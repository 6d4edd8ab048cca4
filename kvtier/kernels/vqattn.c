/* Decode attention on the `vq` codec's blocks (CommVQ: additive vector quantization per token,
 * keys stored before RoPE), in fp32.
 *
 * One call covers one run of consecutive blocks of one layer, all KV heads. Per KV head and
 * block of B tokens, keys and values alike:
 *   codes  B rows of P * S bytes (P = D / DIM sub-vectors, S stages), sub-vector-major: the
 *          code of stage s of sub-vector j is byte j * S + s;
 *   scale  one byte per token (2^(c/12 - 12), 0 for a vector of zeros).
 * The codebooks are (P, S, 256, DIM) fp16 (converted to fp32 once per call when that copy is
 * small enough to stay in the L2 cache), one for keys and one for values: sub-vector j of a
 * token decodes to scale * sum_s book[j][s][code]. Each key is then rotated by RoPE with the
 * unit cos/sin rows `rope` of its position (rotate-half layout) and scored; values are decoded
 * the same way and accumulated under the softmax weights. Nothing but codes is read from the
 * cache and no dense block is written to memory. For the R query rows of a head (pre-scaled)
 * it returns the softmax pieces m, l, o that kvtier.attention.blockwise.merge combines.
 * kvtier.kv.codecs.vq.Vq.attend_torch is the reference this is tested against.
 */
#include "spans.h"

enum { K, KS, V, VS, QFIELDS };

/* fp32 copies of the codebooks, made once per call, pay off for 16-channel sub-vectors when they
 * stay in the L2 cache (1.33 against 2.89 ms for one SmolLM2 layer at 8K); 8-channel ones read
 * as fp16 are faster (1.35 against 1.55 ms), and Gemma's 2 MiB of fp32 copies cost 2x */
#define FP32_BOOKS_MAX (512L << 10)  /* the fields, in Python's order */

typedef struct {
    int n_kv, rows, d, dim, stages, block, n_blocks;
    const void *const *p; const long *hs;  /* each field's base and head stride (elements) */
    const float *rope; long rope_hs;       /* (N, 2, D) rows per head (stride 0: shared) */
    const float *off;                      /* (B, 2, D/2) rows of the offsets in a block (spans.h) */
    const float *book_k, *book_v;          /* the codebooks in fp32 (converted once per call) */
    const _Float16 *half_k, *half_v;       /* or read as fp16, when fp32 copies would crowd the L2 */
    int half;
} QJob;

#define QAT(J, T, f, h, b, per) ((const T *)(J)->p[f] + (h) * (J)->hs[f] + (long)(b) * (per))

/* one token's vector: out[j * DIM + c] = sum_s book[((j * S + s) * 256 + code[j * S + s]) * DIM + c],
 * from fp32 codebooks (f32) or the fp16 ones as given (f16) */
#define DECODE_ROW(NAME, T)                                                                    \
    RINLINE void NAME(const uint8_t *code, const T *book, float *out, const int D, const int DIM, \
                      const int S) {                                                          \
        const int P = D / DIM;                                                                \
        for (int j = 0; j < P; j++) {                                                         \
            float acc[16] = {0};                                                              \
            for (int s = 0; s < S; s++) {                                                     \
                const T *w = book + ((long)(j * S + s) * 256 + code[j * S + s]) * DIM;        \
                for (int c = 0; c < DIM; c++) acc[c] += (float)w[c];                          \
            }                                                                                 \
            for (int c = 0; c < DIM; c++) out[j * DIM + c] = acc[c];                          \
        }                                                                                     \
    }
DECODE_ROW(decode_f32, float)
DECODE_ROW(decode_f16, _Float16)

RINLINE void decode_row(const QJob *J, int key, const uint8_t *code, float *out, const int D, const int DIM,
                        const int S) {
    if (J->half) decode_f16(code, key ? J->half_k : J->half_v, out, D, DIM, S);
    else decode_f32(code, key ? J->book_k : J->book_v, out, D, DIM, S);
}

RINLINE void span_of(const QJob *J, const float *q, int h, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                     const int R, const int D, const int B, const int DIM, const int S) {
    const int C = D / DIM * S;
    float kb[RMAXB * RMAXD], row[RMAXD], s[RMAXR * RMAXB], mr[RMAXR], lr[RMAXR];
    for (int r = 0; r < R; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(o, 0, sizeof(float) * R * D);
    for (int b = b0; b < b1; b++) {
        const uint8_t *kc = QAT(J, uint8_t, K, h, b, B * C), *ks = QAT(J, uint8_t, KS, h, b, B);
        for (int t = 0; t < B; t++) {
            float *kr = kb + t * D;
            decode_row(J, 1, kc + (long)t * C, kr, D, DIM, S);
            const float a = SCALE[ks[t]];
            for (int c = 0; c < D; c++) kr[c] *= a;
        }
        rope_scores(kb, J->rope + h * J->rope_hs + (long)b * B * 2 * D, J->off, q, s, R, D, B);
        online_softmax_from(s, mr, lr, o, R, D, B, b == b0 ? skip : 0);
        const uint8_t *vc = QAT(J, uint8_t, V, h, b, B * C), *vs = QAT(J, uint8_t, VS, h, b, B);
        for (int t = 0; t < B; t++) {
            decode_row(J, 0, vc + (long)t * C, row, D, DIM, S);
            const float a = SCALE[vs[t]];
            for (int r = 0; r < R; r++) {
                const float p = s[r * B + t] * a;
                float *orow = o + r * D;
                for (int c = 0; c < D; c++) orow[c] += p * row[c];
            }
        }
    }
    for (int r = 0; r < R; r++) { m_out[r] = mr[r]; l_out[r] = lr[r]; }
}

static void span(const void *job, const float *q, int h, int b0, int b1, int skip, float *m, float *l, float *o) {
    const QJob *J = job;
    const int R = J->rows, D = J->d, B = J->block, DIM = J->dim, S = J->stages;
#define SHAPE(r, d, b, dm, st) \
    if (R == r && D == d && B == b && DIM == dm && S == st) { span_of(J, q, h, b0, b1, skip, m, l, o, r, d, b, dm, st); return; }
    SHAPE(3, 64, 64, 8, 2) SHAPE(4, 256, 64, 8, 2)     /* SmolLM2 and Gemma 3, 2 bits */
    SHAPE(3, 64, 64, 16, 2) SHAPE(4, 256, 64, 16, 2)   /* 1 bit */
    SHAPE(3, 64, 64, 16, 3) SHAPE(4, 256, 64, 16, 3)   /* 1.5 bits */
#undef SHAPE
    span_of(J, q, h, b0, b1, skip, m, l, o, R, D, B, DIM, S);
}

/* The job of a run of blocks, in one allocation (free() frees it): the sizes, the RoPE offsets
 * and, where fp32 codebooks pay off (see FP32_BOOKS_MAX), their fp32 copies when `copies`;
 * NULL when the sizes are outside what this kernel handles, a block's positions are not
 * consecutive, memory runs out, or fp32 copies would be made without `copies`. */
static QJob *job_of(int n_kv, int rows, int d, int dim, int stages, int block, int n_blocks,
                    const void *const *ptrs, const long *strides, const float *rope, long rope_hs,
                    const _Float16 *book_k, const _Float16 *book_v, int copies) {
    if (d > RMAXD || d % 2 || rows > RMAXR || block > RMAXB || dim < 1 || dim > 16 || d % dim
        || stages < 1 || n_blocks < 1)
        return NULL;
    scale_table();
    const long n_book = (long)d * stages * 256;  /* (D / dim) x stages x 256 x dim */
    const int half = dim <= 8 || 2 * n_book * sizeof(float) > FP32_BOOKS_MAX;
    if (!half && !copies) return NULL;
    QJob *J = malloc(sizeof(QJob) + sizeof(float) * ((size_t)block * d + (half ? 0 : 2 * (size_t)n_book)));
    if (!J) return NULL;
    float *off = (float *)(J + 1), *books = off + (size_t)block * d;
    if (rope_offsets(rope, rope_hs, rope_hs ? n_kv : 1, n_blocks, block, d, off)) { free(J); return NULL; }
    *J = (QJob){n_kv, rows, d, dim, stages, block, n_blocks, ptrs, strides, rope, rope_hs, off, NULL, NULL,
                book_k, book_v, half};
    if (!half) {
        for (long i = 0; i < n_book; i++) { books[i] = (float)book_k[i]; books[n_book + i] = (float)book_v[i]; }
        J->book_k = books;
        J->book_v = books + n_book;
    }
    return J;
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles (the caller falls back). */
int kvtier_vq_attend(const float *q, int n_kv, int rows, int d, int dim, int stages, int block, int n_blocks,
                     const void *const *ptrs, const long *strides, const float *rope, long rope_hs,
                     const _Float16 *book_k, const _Float16 *book_v, float *m, float *l, float *o, int threads) {
    QJob *J = job_of(n_kv, rows, d, dim, stages, block, n_blocks, ptrs, strides, rope, rope_hs, book_k, book_v, 1);
    if (!J) return 1;
    const int rc = run_spans(J, span, q, n_kv, rows, d, n_blocks, m, l, o, threads);
    free(J);
    return rc;
}

/* The same run as a job for batched.c's SPAN parts, or NULL; and its span function. A job keeps
 * no fp32 copies of the codebooks (they would be made per run and kept while it lasts): sizes
 * whose books would be copied have no job and keep the call of their own. */
void *kvtier_vq_job(int n_kv, int rows, int d, int dim, int stages, int block, int n_blocks,
                    const void *const *ptrs, const long *strides, const float *rope, long rope_hs,
                    const _Float16 *book_k, const _Float16 *book_v) {
    return job_of(n_kv, rows, d, dim, stages, block, n_blocks, ptrs, strides, rope, rope_hs, book_k, book_v, 0);
}

void *kvtier_vq_span(void) { return (void *)span; }
