/* Decode attention on the `nuq` codec's blocks (KVQuant: non-uniform codebooks, fp16 outliers,
 * keys stored before RoPE), in fp32.
 *
 * One call covers one run of consecutive blocks of one layer, all KV heads. Per KV head and
 * block of B tokens:
 *   keys    token-major codes, a row of D codes packed in planes (kvtier.kv.codecs.packing:
 *           code c sits in byte c % m at bit (c / m) * bits, m = D * bits / 8); one scale code
 *           (uint8, 2^(c/12 - 12), 0 for code 0) and one int8 centre (in scale / 8) per channel;
 *   values  the same codes per token; one scale and centre per token and `group` channels;
 *   outliers `n_out` (int16 index into the block's B*D elements, fp16 difference) for each.
 * A code decodes to (lut[code] + centre / 8) * scale, one lookup per code. The keys are then
 * rotated by RoPE with the unit cos/sin rows `rope` of their positions (rotate-half layout), so
 * nothing but codes is read from the cache and no dense block is written to memory: each block
 * is decoded into a small buffer, scored and accumulated by online softmax. For the R query
 * rows of a head (pre-scaled) it returns the softmax pieces m, l, o that
 * kvtier.attention.blockwise.merge combines; work is split over (head, run of blocks) tasks.
 * kvtier.kv.codecs.nuq.Nuq.attend_torch is the reference this is tested against.
 */
#include "spans.h"

#define NMAXD RMAXD
#define NMAXR RMAXR
#define NMAXB RMAXB

enum { K, KS, KZ, V, VS, VZ, KI, KD, VI, VD, NFIELDS };  /* the fields, in Python's order */

typedef struct {
    int n_kv, rows, d, bits, group, block, n_blocks, n_out;
    const void *const *p; const long *hs;  /* each field's base and head stride (elements) */
    const float *rope; long rope_hs;       /* (N, 2, D) rows per head (stride 0: shared) */
    const float *off;                      /* (B, 2, D/2) rows of the offsets in a block (spans.h) */
    const float *lut_k, *lut_v;
} NJob;

/* field f of head h, block b (per block: `per` elements) */
#define AT(J, T, f, h, b, per) ((const T *)(J)->p[f] + (h) * (J)->hs[f] + (long)(b) * (per))

#define NINLINE RINLINE

/* one head's pieces over blocks [b0, b1); R, D, B and bits are compile-time constants in the
 * specialised calls of span() (the loops then unroll and keep their accumulators in registers) */
NINLINE void span_of(const NJob *J, const float *q, int h, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                     const int R, const int D, const int B, const int bits) {
    const int P = D * bits / 8;
    const int ng = D / J->group, C = J->n_out;
    float kb[NMAXB * NMAXD], vb[NMAXB * NMAXD], s[NMAXR * NMAXB];
    float sc[NMAXD], zc[NMAXD], mr[NMAXR], lr[NMAXR];
    for (int r = 0; r < R; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(o, 0, sizeof(float) * R * D);
    nvf tk, tv;  /* the codebooks as 16-entry tables (2 bits: 4 used) */
    for (int c = 0; c < 16; c++) { tk[c] = J->lut_k[c & ((1 << bits) - 1)]; tv[c] = J->lut_v[c & ((1 << bits) - 1)]; }
    for (int b = b0; b < b1; b++) {
        /* keys: codes through the codebook, per-channel scale and centre */
        const uint8_t *kc = AT(J, uint8_t, K, h, b, B * P);
        const uint8_t *ksc = AT(J, uint8_t, KS, h, b, D);
        const int8_t *kzc = AT(J, int8_t, KZ, h, b, D);
        for (int c = 0; c < D; c++) { sc[c] = SCALE[ksc[c]]; zc[c] = kzc[c] * 0.125f * sc[c]; }
        for (int t = 0; t < B; t++) {
            float *row = kb + t * D;
            unpack_row(kc + (long)t * P, J->lut_k, tk, row, D, bits);
            for (int c = 0; c < D; c++) row[c] = row[c] * sc[c] + zc[c];
        }
        if (C) {
            const int16_t *ix = AT(J, int16_t, KI, h, b, C);
            const _Float16 *dx = AT(J, _Float16, KD, h, b, C);
            for (int i = 0; i < C; i++) kb[ix[i]] += (float)dx[i];
        }
        /* RoPE at each token's position, then the scores of every query row; online softmax */
        rope_scores(kb, J->rope + h * J->rope_hs + (long)b * B * 2 * D, J->off, q, s, R, D, B);
        online_softmax_from(s, mr, lr, o, R, D, B, b == b0 ? skip : 0);
        /* values: per-token groups, outliers added, accumulated under the weights */
        const uint8_t *vc = AT(J, uint8_t, V, h, b, B * P);
        const uint8_t *vsc = AT(J, uint8_t, VS, h, b, B * ng);
        const int8_t *vzc = AT(J, int8_t, VZ, h, b, B * ng);
        for (int t = 0; t < B; t++) {
            float *row = vb + t * D;
            unpack_row(vc + (long)t * P, J->lut_v, tv, row, D, bits);
            for (int g = 0; g < ng; g++) {
                const float a = SCALE[vsc[t * ng + g]], z = vzc[t * ng + g] * 0.125f * a;
                for (int c = g * J->group; c < (g + 1) * J->group; c++) row[c] = row[c] * a + z;
            }
        }
        if (C) {
            const int16_t *ix = AT(J, int16_t, VI, h, b, C);
            const _Float16 *dx = AT(J, _Float16, VD, h, b, C);
            for (int i = 0; i < C; i++) vb[ix[i]] += (float)dx[i];
        }
        weighted_sum(o, s, vb, R, D, B, D);
    }
    for (int r = 0; r < R; r++) { m_out[r] = mr[r]; l_out[r] = lr[r]; }
}

static void span(const void *job, const float *q, int h, int b0, int b1, int skip, float *m, float *l, float *o) {
    const NJob *J = job;
    const int R = J->rows, D = J->d, B = J->block, bits = J->bits;
#define SHAPE(r, d, b, k) if (R == r && D == d && B == b && bits == k) { span_of(J, q, h, b0, b1, skip, m, l, o, r, d, b, k); return; }
    SHAPE(3, 64, 64, 2) SHAPE(3, 64, 64, 4)     /* SmolLM2: 9 query heads over 3 KV heads */
    SHAPE(4, 256, 64, 2) SHAPE(4, 256, 64, 4)   /* Gemma 3: 4 query heads over 1 KV head */
    SHAPE(1, 64, 64, 2) SHAPE(1, 256, 64, 2)
#undef SHAPE
    span_of(J, q, h, b0, b1, skip, m, l, o, R, D, B, bits);
}

/* The job of a run of blocks, with its RoPE offsets, in one allocation (free() frees it); NULL
 * when the sizes are outside what this kernel handles, a block's positions are not consecutive
 * or memory runs out. */
static NJob *job_of(int n_kv, int rows, int d, int bits, int group, int block, int n_blocks, int n_out,
                    const void *const *ptrs, const long *strides, const float *rope, long rope_hs,
                    const float *lut_k, const float *lut_v) {
    if (d > NMAXD || d % 2 || rows > NMAXR || block > NMAXB || (bits != 2 && bits != 4) || group < 1 || d % group
        || (d * bits) % 8 || n_blocks < 1)
        return NULL;
    scale_table();
    NJob *J = malloc(sizeof(NJob) + sizeof(float) * block * d);
    if (!J) return NULL;
    float *off = (float *)(J + 1);
    if (rope_offsets(rope, rope_hs, rope_hs ? n_kv : 1, n_blocks, block, d, off)) { free(J); return NULL; }
    *J = (NJob){n_kv, rows, d, bits, group, block, n_blocks, n_out, ptrs, strides, rope, rope_hs, off, lut_k, lut_v};
    return J;
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles (the caller falls back). */
int kvtier_nuq_attend(const float *q, int n_kv, int rows, int d, int bits, int group, int block,
                      int n_blocks, int n_out, const void *const *ptrs, const long *strides,
                      const float *rope, long rope_hs, const float *lut_k, const float *lut_v,
                      float *m, float *l, float *o, int threads) {
    NJob *J = job_of(n_kv, rows, d, bits, group, block, n_blocks, n_out, ptrs, strides, rope, rope_hs, lut_k, lut_v);
    if (!J) return 1;
    const int rc = run_spans(J, span, q, n_kv, rows, d, n_blocks, m, l, o, threads);
    free(J);
    return rc;
}

/* The same run as a job for batched.c's SPAN parts, or NULL; and its span function. */
void *kvtier_nuq_job(int n_kv, int rows, int d, int bits, int group, int block, int n_blocks, int n_out,
                     const void *const *ptrs, const long *strides, const float *rope, long rope_hs,
                     const float *lut_k, const float *lut_v) {
    return job_of(n_kv, rows, d, bits, group, block, n_blocks, n_out, ptrs, strides, rope, rope_hs, lut_k, lut_v);
}

void *kvtier_nuq_span(void) { return (void *)span; }
