/* Decode attention on the `rotatekv` codec's blocks (RotateKV: keys stored before RoPE, every
 * token's channels reordered and rotated by a block-diagonal Walsh-Hadamard matrix whose
 * blocks span KV heads), in fp32.
 *
 * One call covers one run of consecutive blocks of one layer. Because a rotation mixes the
 * channels of several KV heads, a token is decoded for all heads at once:
 *   codes   per stored head j and token, a row of D codes packed in planes
 *           (kvtier.kv.codecs.packing), stored head j holding channels j*D .. j*D+D-1 of the
 *           rotated vector of H*D channels;
 *   keys    one scale code (uint8, 2^(c/12 - 12)) and one int8 zero (in scale / 8) per token
 *           and `group` channels, or per channel over the block (keys=channel);
 *   values  per token and `group` channels.
 * A code decodes to (code + zero / 8) * scale, the rotation's 1/sqrt(rotate) folded into the
 * scale. A key is rotated back by a fast Walsh-Hadamard transform over each run of `rotate`
 * channels (in registers), its channels put back in their order (`inv`: the rotated position
 * of each channel), the calibrated mean added for centre=true, and it is then turned by RoPE at
 * its position (spans.h) and scored. A transform that mixes channels does not commute with
 * RoPE, which turns each position by its own angles, so for keys it cannot move to the query
 * and is undone per token. Values need no RoPE: they are accumulated under the weights in the
 * rotated space (each query row over all H*D channels) and rotated back once per call, since
 * the transform is linear. Nothing but codes is read from the cache and no dense block is
 * written to memory. For the query rows (pre-scaled, R per KV head) it returns the softmax
 * pieces m, l, o that kvtier.attention.blockwise.merge combines; the blocks are split over
 * threads. kvtier.kv.codecs.rotatekv.RotateKV.attend_torch is the reference this is tested
 * against.
 */
#include "spans.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define KMAXH 2048  /* channels of all KV heads together */

enum { K, KS, KZ, V, VS, VZ, NFIELDS };  /* the fields, in Python's order */

typedef struct {
    int n_kv, rows, d, bits, group, block, n_blocks, rotate, channel_keys;
    const void *const *p; const long *hs;  /* each field's base and head stride (elements) */
    const float *rope; long rope_hs;       /* (N, 2, D) rows per head (stride 0: shared) */
    const int32_t *inv;                    /* (H*D) rotated position of each channel, or NULL */
    const float *mean;                     /* (H*D) key means added back, or NULL */
    int *failed;                           /* set when a task's buffers could not be had */
} KJob;

#define KAT(J, T, f, h, b, per) ((const T *)(J)->p[f] + (h) * (J)->hs[f] + (long)(b) * (per))

/* rotatekv's scale codes have no zero code: 2^(c/12 - 12) for every c */
static float RSCALE[256];

static void rscale_table(void) {
    if (RSCALE[255] != 0.f) return;
    for (int c = 0; c < 256; c++) RSCALE[c] = exp2f(c / 12.0f - 12.0f);
}

/* in-register butterflies of a 16-lane vector, for distances 1, 2, 4 and 8 */
typedef struct { nvi idx[4]; nvf sgn[4]; } Lanes;

static Lanes lanes(void) {
    Lanes L;
    for (int s = 0; s < 4; s++)
        for (int i = 0; i < 16; i++) {
            L.idx[s][i] = i ^ (1 << s);
            L.sgn[s][i] = (i >> s) & 1 ? -1.f : 1.f;
        }
    return L;
}

/* unnormalised Walsh-Hadamard transform (Sylvester order) of each run of n channels of x: the
 * butterflies of distance 1-8 inside 16-lane vectors, the longer ones between vectors */
RINLINE void fwht(float *x, const int width, const int n, const Lanes *L) {
    if (n < 16) {
        for (int base = 0; base < width; base += n)
            for (int h = 1; h < n; h *= 2)
                for (int i = base; i < base + n; i += 2 * h)
                    for (int j = i; j < i + h; j++) {
                        const float a = x[j], b = x[j + h];
                        x[j] = a + b;
                        x[j + h] = a - b;
                    }
        return;
    }
    for (int base = 0; base < width; base += n) {
        nvf v[RMAXD * 2 / 16];
        const int nv = n / 16;
        memcpy(v, x + base, sizeof(float) * n);
        for (int i = 0; i < nv; i++)
            for (int s = 0; s < 4; s++) v[i] = __builtin_shuffle(v[i], v[i], L->idx[s]) + L->sgn[s] * v[i];
        for (int h = 1; h < nv; h *= 2)
            for (int i = 0; i < nv; i += 2 * h)
                for (int j = i; j < i + h; j++) {
                    const nvf a = v[j], b = v[j + h];
                    v[j] = a + b;
                    v[j + h] = a - b;
                }
        memcpy(x + base, v, sizeof(float) * n);
    }
}

/* token t of block b of field f (codes at f, scales at f+1, zeros at f+2), all H heads, into
 * the rotated space (W = H*D channels, the rotation's 1/sqrt(rotate) folded into the scales);
 * keys stored per channel (keys=channel) take the block's scales sc, zc */
RINLINE void dequant_token(const KJob *J, const int f, const int b, const int t, const int per_channel,
                           float *restrict flat, const float *restrict sc, const float *restrict zc,
                           const nvf table, const float norm, const int H, const int D, const int B,
                           const int bits) {
    static const float ident[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int P = D * bits / 8, G = J->group, ng = D / G;
    for (int j = 0; j < H; j++) {
        float *row = flat + j * D;
        unpack_row(KAT(J, uint8_t, f, j, b, B * P) + (long)t * P, ident, table, row, D, bits);
        if (per_channel) {
            for (int c = 0; c < D; c++) row[c] = row[c] * sc[j * D + c] + zc[j * D + c];
        } else {
            const uint8_t *s8 = KAT(J, uint8_t, f + 1, j, b, B * ng) + t * ng;
            const int8_t *z8 = KAT(J, int8_t, f + 2, j, b, B * ng) + t * ng;
            for (int g = 0; g < ng; g++) {
                const float a = RSCALE[s8[g]] * norm, z = z8[g] * 0.125f * a;
                for (int c = g * G; c < (g + 1) * G; c++) row[c] = row[c] * a + z;
            }
        }
    }
}

/* head h's D channels, in their own order, from a vector rotated back (flat, W channels) */
RINLINE void gather_head(const KJob *J, const float *restrict flat, float *restrict dst, const int h, const int D) {
    if (!J->inv) {
        memcpy(dst, flat + h * D, sizeof(float) * D);
        return;
    }
    const int32_t *inv = J->inv + h * D;
#ifdef __AVX512F__
    if (D % 16 == 0) {
        for (int c = 0; c < D; c += 16)
            _mm512_storeu_ps(dst + c, _mm512_i32gather_ps(_mm512_loadu_si512(inv + c), flat, 4));
        return;
    }
#endif
    for (int c = 0; c < D; c++) dst[c] = flat[inv[c]];
}

/* every head's pieces over blocks [b0, b1); H, R, D, B and bits are compile-time constants in
 * the specialised calls of span(). Keys are rotated back per token (RoPE needs them in their
 * own channels); values are accumulated in the rotated space, each head's rows over all W
 * channels, and rotated back once at the end: the transform is linear. */
RINLINE void span_of(const KJob *J, const float *q, int b0, int b1, float *m_out, float *l_out, float *o,
                     const int H, const int R, const int D, const int B, const int bits, const int rot) {
    const int W = H * D, HR = H * R;
    const float norm = 1.f / sqrtf((float)J->rotate);
    float *kb = malloc(sizeof(float) * ((long)H * B * D + (long)B * W + (long)HR * B + (long)HR * W + 3L * W));
    if (!kb) {  /* no memory: the call fails and the caller takes the reference */
        *J->failed = 1;
        for (int r = 0; r < HR; r++) { m_out[r] = -FLT_MAX; l_out[r] = 0.f; }
        memset(o, 0, sizeof(float) * HR * D);
        return;
    }
    float *vb = kb + (long)H * B * D, *s = vb + (long)B * W, *ox = s + (long)HR * B;
    float *flat = ox + (long)HR * W, *sc = flat + W, *zc = sc + W;
    float mr[KMAXH / 8], lr[KMAXH / 8];
    for (int r = 0; r < HR; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(ox, 0, sizeof(float) * HR * W);
    const Lanes L = lanes();
    nvf table;
    for (int c = 0; c < 16; c++) table[c] = (float)c;
    for (int b = b0; b < b1; b++) {
        if (J->channel_keys)
            for (int j = 0; j < H; j++) {
                const uint8_t *s8 = KAT(J, uint8_t, KS, j, b, D);
                const int8_t *z8 = KAT(J, int8_t, KZ, j, b, D);
                for (int c = 0; c < D; c++) {
                    sc[j * D + c] = RSCALE[s8[c]] * norm;
                    zc[j * D + c] = z8[c] * 0.125f * sc[j * D + c];
                }
            }
        for (int t = 0; t < B; t++) {
            dequant_token(J, K, b, t, J->channel_keys, flat, sc, zc, table, norm, H, D, B, bits);
            fwht(flat, W, rot, &L);
            for (int h = 0; h < H; h++) {
                float *dst = kb + ((long)h * B + t) * D;
                gather_head(J, flat, dst, h, D);
                if (J->mean)
                    for (int c = 0; c < D; c++) dst[c] += J->mean[h * D + c];
            }
        }
        for (int h = 0; h < H; h++) {
            rope_scores(kb + (long)h * B * D, J->rope + h * J->rope_hs + (long)b * B * 2 * D,
                        q + (long)h * R * D, s + h * R * B, R, D, B);
            online_softmax(s + h * R * B, mr + h * R, lr + h * R, ox + (long)h * R * W, R, W, B);
        }
        for (int t = 0; t < B; t++)
            dequant_token(J, V, b, t, 0, vb + (long)t * W, sc, zc, table, norm, H, D, B, bits);
        weighted_sum(ox, s, vb, HR, W, B);  /* every row over all W rotated channels */
    }
    for (int r = 0; r < HR; r++) {
        m_out[r] = mr[r];
        l_out[r] = lr[r];
        fwht(ox + (long)r * W, W, rot, &L);
        gather_head(J, ox + (long)r * W, o + (long)r * D, r / R, D);
    }
    free(kb);
}

/* run_spans' task: all heads of a run of blocks (its head index is always 0) */
static void span(const void *job, const float *q, int h, int b0, int b1, float *m, float *l, float *o) {
    (void)h;
    const KJob *J = job;
    const int H = J->n_kv, R = J->rows, D = J->d, B = J->block, bits = J->bits, rot = J->rotate;
#define SHAPE(hh, r, d, bb, k) \
    if (H == hh && R == r && D == d && B == bb && bits == k && rot == 64) { \
        span_of(J, q, b0, b1, m, l, o, hh, r, d, bb, k, 64); return; }
    SHAPE(3, 3, 64, 64, 2) SHAPE(3, 3, 64, 64, 4)       /* SmolLM2: 9 query heads over 3 KV heads */
    SHAPE(1, 4, 256, 64, 2) SHAPE(1, 4, 256, 64, 4)     /* Gemma 3: 4 query heads over 1 KV head */
#undef SHAPE
    span_of(J, q, b0, b1, m, l, o, H, R, D, B, bits, rot);
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles or memory runs out (the
 * caller falls back). */
int kvtier_rotatekv_attend(const float *q, int n_kv, int rows, int d, int bits, int group, int block,
                           int n_blocks, int rotate, int channel_keys, const void *const *ptrs,
                           const long *strides, const float *rope, long rope_hs, const int32_t *inv,
                           const float *mean, float *m, float *l, float *o, int threads) {
    const int w = n_kv * d;
    if (d > RMAXD || d % 2 || rows > RMAXR || block > RMAXB || w > KMAXH || n_kv * rows > KMAXH / 8
        || (bits != 2 && bits != 4) || group < 1 || d % group || (d * bits) % 8 || n_blocks < 1
        || rotate < 2 || rotate > 2 * RMAXD || (rotate & (rotate - 1)) || w % rotate)
        return 1;
    rscale_table();
    int failed = 0;
    KJob J = {n_kv, rows, d, bits, group, block, n_blocks, rotate, channel_keys, ptrs, strides, rope, rope_hs,
              inv, mean, &failed};
    return run_spans(&J, span, q, 1, n_kv * rows, d, n_blocks, m, l, o, threads) || failed;
}
