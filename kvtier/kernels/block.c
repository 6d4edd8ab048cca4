/* A Llama-family layer's work around its attention, for a few rows of bf16 (a decode step), in
 * two calls instead of the eleven kernel calls and tensor ops the model makes one by one
 * (kvtier.models.llama.Llama.layer, the reference). Each step is the kernel that path calls, with
 * the same arguments, in the same order, so the numbers are the same bit for bit; what is saved
 * is Python's share of a decode step: at 1K on SmolLM2 about half of it went to dispatching
 * these calls. kvtier.models.native.NativeBlock makes the calls.
 *
 *   kvtier_block_in:  s = x + delta, h = RMSNorm(s); qkv = h Wqkv^T; q, k = RoPE of qkv's columns
 *   kvtier_block_out: h = o Wo^T; s' = s + h, y = RMSNorm(s'); delta' = (silu(y Wg^T) * y Wu^T) Wd^T
 */

#include <stdint.h>
#include <stdlib.h>

int kvtier_rms_norm(const void *x, int64_t ldx, const void *delta, int64_t ldd, void *sum, int64_t lds, int64_t N,
                    int64_t C, const float *w, float eps, float offset, int bf16, void *y, int64_t ldy, int threads);
int kvtier_qmatmul_bf16(const uint16_t *x16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                        const uint16_t *mn, int64_t N, int bits, uint16_t *y16, int threads);
int kvtier_rope(const void *x, int64_t ldx, int64_t N, int64_t H, int64_t D, const void *cos, const void *sin,
                int64_t ldc, int bf16, void *out, int threads);
int kvtier_silu_mul(const void *gu, int64_t N, int64_t F, int bf16, void *out, int threads);

/* a group-quantized matrix as kvtier.weights.quant.GroupQuant holds it: W (n, k) */
typedef struct {
    const uint8_t *codes;
    const uint16_t *d, *m;
    int64_t n, k, bits;
} QMat;

/* one layer's fixed part: its norms' weights (fp32), shapes and matrices */
typedef struct {
    const float *norm_in, *norm_post;
    double eps, offset;
    int64_t c, hq, hkv, d, f;
    QMat qkv, o, gate_up, down;
} Block;

static int mm(const QMat *w, const uint16_t *x, int64_t M, uint16_t *y, int threads) {
    return kvtier_qmatmul_bf16(x, M, w->k, w->codes, w->d, w->m, w->n, (int)w->bits, y, threads);
}

/* x, delta (M, c) rows (delta NULL: the first layer, s is x and is not written); cos, sin rows of
 * d at row stride ldc. Out: s (M, c), qkv (M, (hq + 2 hkv) d) (v is its last hkv d columns),
 * q (M, hq, d), k (M, hkv, d). 0, or -1 when a kernel refused (nothing the caller keeps is valid). */
int kvtier_block_in(const Block *b, const uint16_t *x, const uint16_t *delta, int64_t M, const void *cos,
                    const void *sin, int64_t ldc, uint16_t *s, uint16_t *qkv, uint16_t *q, uint16_t *k, int threads) {
    const int64_t c = b->c, nq = b->qkv.n;
    if (b->qkv.k != c || nq != (b->hq + 2 * b->hkv) * b->d) return -1;
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(M * c));
    if (!h) return -1;
    int rc = kvtier_rms_norm(x, c, delta, c, delta ? s : NULL, c, M, c, b->norm_in, (float)b->eps, (float)b->offset, 1,
                             h, c, threads);
    if (rc == 0) rc = mm(&b->qkv, h, M, qkv, threads);
    if (rc == 0) rc = kvtier_rope(qkv, nq, M, b->hq, b->d, cos, sin, ldc, 1, q, threads);
    if (rc == 0) rc = kvtier_rope(qkv + b->hq * b->d, nq, M, b->hkv, b->d, cos, sin, ldc, 1, k, threads);
    free(h);
    return rc;
}

/* o (M, hq d) attention output, s (M, c) the residual stream. Out: s2 = s + o Wo^T, and the MLP's
 * output on RMSNorm(s2) in delta (M, c), not yet added. */
int kvtier_block_out(const Block *b, const uint16_t *o, const uint16_t *s, int64_t M, uint16_t *s2, uint16_t *delta,
                     int threads) {
    const int64_t c = b->c, f = b->f;
    if (b->o.k != b->hq * b->d || b->o.n != c || b->gate_up.k != c || b->gate_up.n != 2 * f || b->down.k != f
        || b->down.n != c)
        return -1;
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(M * (2 * c + 3 * f)));
    if (!h) return -1;
    uint16_t *y = h + M * c, *gu = y + M * c, *a = gu + 2 * M * f;
    int rc = mm(&b->o, o, M, h, threads);
    if (rc == 0)
        rc = kvtier_rms_norm(s, c, h, c, s2, c, M, c, b->norm_post, (float)b->eps, (float)b->offset, 1, y, c, threads);
    if (rc == 0) rc = mm(&b->gate_up, y, M, gu, threads);
    if (rc == 0) rc = kvtier_silu_mul(gu, M, f, 1, a, threads);
    if (rc == 0) rc = mm(&b->down, a, M, delta, threads);
    free(h);
    return rc;
}
