/* Decode attention on the `rotatekv` codec's blocks (RotateKV: keys stored before RoPE, every
 * token's key channels reordered and rotated by a block-diagonal Walsh-Hadamard matrix whose
 * blocks span KV heads; values reordered within each head and rotated by the same blocks), in
 * fp32.
 *
 * One call covers one run of consecutive blocks of one layer. When a rotation or the key order
 * mixes the channels of several KV heads, a token is decoded for all heads at once; when each
 * head keeps its channels (rotate <= D, the codec's default then), each KV head is a task of
 * its own (heads_apart), and the run can be a job of batched.c's SPAN parts:
 *   codes   per stored head j and token, a row of D codes packed in planes
 *           (kvtier.kv.codecs.packing), stored head j holding channels j*D .. j*D+D-1 of the
 *           rotated vector of H*D channels;
 *   keys    one scale code (uint8, 2^(c/12 - 12)) and one int8 zero (in scale / 8) per token
 *           and `group` channels, or per channel over the block (keys=channel);
 *   values  per token and `group` channels.
 * A code decodes to (code + zero / 8) * scale, the rotation's 1/sqrt(rotate) folded into the
 * scale. A key is rotated back by a fast Walsh-Hadamard transform over each run of `rotate`
 * channels (in registers), its channels put back in their order (`inv`: the rotated position
 * of each channel), the calibrated mean added for centre=true, and it is then
 * turned by RoPE at its position (spans.h) and scored. A transform that mixes channels does
 * not commute with RoPE, which turns each position by its own angles, so for keys it cannot
 * move to the query and is undone per token. Values need no RoPE and their reordering stays
 * within each head: each head's query rows accumulate them under the weights in the rotated
 * space, over the rotation runs that hold that head's channels (its own D when rotate <= D),
 * and the sums are rotated back and put back in their order (`vinv`) once per call, since the
 * transform is linear. Nothing but codes is read from the cache
 * and no dense block is written to memory. For the query rows (pre-scaled, R per KV head) it
 * returns the softmax pieces m, l, o that kvtier.attention.blockwise.merge combines; the
 * blocks are split over threads. kvtier.kv.codecs.rotatekv.RotateKV.attend_torch is the
 * reference this is tested against.
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
    const float *off;                      /* (B, 2, D/2) rows of the offsets in a block (spans.h) */
    const int32_t *inv;                    /* (H*D) rotated position of each channel, or NULL */
    const float *mean;                     /* (H*D) key means added back, or NULL */
    const int32_t *vinv;                   /* (H*D) each value channel's place in its head, or NULL */
    int apart;                             /* heads apart (see heads_apart): one task per head */
    const int32_t *linv;                   /* apart: (H*D) inv within each head */
    const int32_t *pidx;                   /* apart, D <= PMAXD: (H*D) each channel's source lane */
    const uint16_t *pmask;                 /* in its pair of vectors; (H, D/16, D/32) lanes per pair */
    int failed;                            /* set when a task's buffers could not be had */
} KJob;

#define PMAXD 128  /* head dims up to this put a head's keys back in order by two-vector permutes */

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
            if (G % 16 == 0) {  /* a vector at a time (the group is not a compile-time constant) */
                for (int c = 0; c < D; c += 16) {
                    const float a = RSCALE[s8[c / G]] * norm, z = z8[c / G] * 0.125f * a;
                    storev(row + c, loadv(row + c) * a + z);
                }
                continue;
            }
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

/* the value channels a head's query rows sum, from channel h * D / S * S of the rotated
 * vector: the head's own D when whole rotation runs fit in it, the one run holding it when a
 * run spans heads, else all W */
static inline int value_span(const int H, const int D, const int rot) {
    return D % rot == 0 ? D : rot % D == 0 ? rot : H * D;
}

/* each head's rows += the block's weights times its values (vb, B rows of W), over the rotation
 * runs that hold the head's channels (value_span) */
RINLINE void sum_values(float *ox, const float *s, const float *vb, const int H, const int R, const int D,
                        const int B, const int S) {
    for (int h = 0; h < H; h++)
        weighted_sum(ox + (long)h * R * S, s + h * R * B, vb + h * D / S * S, R, S, B, H * D);
}

/* the pieces out: each row's value sums rotated back and its head's D channels taken, put back
 * in their order when the values were reordered within each head (vinv; then S == D) */
RINLINE void finish_rows(const KJob *J, const float *mr, const float *lr, float *ox, float *m_out, float *l_out,
                         float *o, const int HR, const int R, const int D, const int S, const int rot,
                         const Lanes *L) {
    for (int r = 0; r < HR; r++) {
        m_out[r] = mr[r];
        l_out[r] = lr[r];
        fwht(ox + (long)r * S, S, rot, L);
        const float *src = ox + (long)r * S + r / R * D % S;
        if (J->vinv) {
            const int32_t *at = J->vinv + r / R * D;
            for (int c = 0; c < D; c++) o[(long)r * D + c] = src[at[c]];
        } else {
            memcpy(o + (long)r * D, src, sizeof(float) * D);
        }
    }
}

/* no memory for a task's buffers: the call fails and the caller takes the reference */
static void failed_rows(const KJob *J, float *m_out, float *l_out, float *o, const int HR, const int D) {
    ((KJob *)J)->failed = 1;  /* any task's failure fails the call */
    for (int r = 0; r < HR; r++) { m_out[r] = -FLT_MAX; l_out[r] = 0.f; }
    memset(o, 0, sizeof(float) * HR * D);
}

/* every head's pieces over blocks [b0, b1); H, R, D, B and bits are compile-time constants in
 * the specialised calls of span(). Keys are rotated back per token (RoPE needs them in their
 * own channels); values are accumulated in the rotated space, each head's rows over all W
 * channels, and rotated back once at the end: the transform is linear. */
RINLINE void span_of(const KJob *J, const float *q, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                     const int H, const int R, const int D, const int B, const int bits, const int rot) {
    const int W = H * D, HR = H * R, S = value_span(H, D, rot);
    const float norm = 1.f / sqrtf((float)J->rotate);
    float *kb = malloc(sizeof(float) * ((long)H * B * D + (long)B * W + (long)HR * B + (long)HR * S + 3L * W));
    if (!kb) {  /* no memory: the call fails and the caller takes the reference */
        failed_rows(J, m_out, l_out, o, HR, D);
        return;
    }
    float *vb = kb + (long)H * B * D, *s = vb + (long)B * W, *ox = s + (long)HR * B;
    float *flat = ox + (long)HR * S, *sc = flat + W, *zc = sc + W;
    float mr[KMAXH / 8], lr[KMAXH / 8];
    for (int r = 0; r < HR; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(ox, 0, sizeof(float) * HR * S);
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
            rope_scores(kb + (long)h * B * D, J->rope + h * J->rope_hs + (long)b * B * 2 * D, J->off,
                        q + (long)h * R * D, s + h * R * B, R, D, B);
            online_softmax_from(s + h * R * B, mr + h * R, lr + h * R, ox + (long)h * R * S, R, S, B,
                                b == b0 ? skip : 0);
        }
        for (int t = 0; t < B; t++)
            dequant_token(J, V, b, t, 0, vb + (long)t * W, sc, zc, table, norm, H, D, B, bits);
        sum_values(ox, s, vb, H, R, D, B, S);
    }
    finish_rows(J, mr, lr, ox, m_out, l_out, o, HR, R, D, S, rot, &L);
    free(kb);
}

#ifdef __AVX512F__
/* token t of block b of field f (codes at f, scales at f+1, zeros at f+2), all H heads, into the
 * vectors x (W / 16 of them) of the rotated space: each plane of a stored head's packed row is
 * whole vectors (D * bits / 8 a multiple of 16); keys stored per channel take the block's
 * scale vectors sc, zc */
RINLINE void token_vectors(const KJob *J, const int f, const int b, const int t, const int per_channel,
                           nvf *restrict x, const nvf *restrict sc, const nvf *restrict zc, const float norm,
                           const int H, const int D, const int B, const int bits, const int G) {
    const int P = D * bits / 8, per = 8 / bits, m = D / per, ng = D / G, mask = (1 << bits) - 1;
    for (int j = 0; j < H; j++) {
        const uint8_t *row = KAT(J, uint8_t, f, j, b, B * P) + (long)t * P;
        float a[RMAXD / 16], z[RMAXD / 16];
        if (!per_channel) {
            const uint8_t *s8 = KAT(J, uint8_t, f + 1, j, b, B * ng) + t * ng;
            const int8_t *z8 = KAT(J, int8_t, f + 2, j, b, B * ng) + t * ng;
            for (int g = 0; g < ng; g++) { a[g] = RSCALE[s8[g]] * norm; z[g] = z8[g] * 0.125f * a[g]; }
        }
        for (int k = 0; k < m; k += 16) {
            const nvi c = (nvi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k)));
            for (int i = 0; i < per; i++) {
                const int ch = i * m + k, u = j * D / 16 + ch / 16;
                const nvf v = __builtin_convertvector((c >> (i * bits)) & mask, nvf);
                x[u] = per_channel ? v * sc[u] + zc[u] : v * a[ch / G] + z[ch / G];
            }
        }
    }
}

/* the unnormalised Walsh-Hadamard transform of each run of rot channels of the vectors x */
RINLINE void fwht_vectors(nvf *x, const int NV, const int rot, const Lanes *L) {
#pragma GCC unroll 32
    for (int i = 0; i < NV; i++) {  /* distances 1, 2 in 128-bit lanes, 4, 8 across them (no vpermps) */
        __m512 y = (__m512)x[i];
        y = _mm512_fmadd_ps((__m512)L->sgn[0], y, _mm512_permute_ps(y, 0xB1));
        y = _mm512_fmadd_ps((__m512)L->sgn[1], y, _mm512_permute_ps(y, 0x4E));
        y = _mm512_fmadd_ps((__m512)L->sgn[2], y, _mm512_shuffle_f32x4(y, y, 0xB1));
        x[i] = (nvf)_mm512_fmadd_ps((__m512)L->sgn[3], y, _mm512_shuffle_f32x4(y, y, 0x4E));
    }
#pragma GCC unroll 32
    for (int base = 0; base < NV; base += rot / 16)
#pragma GCC unroll 8
        for (int h = 1; h < rot / 16; h *= 2)
#pragma GCC unroll 32
            for (int i = base; i < base + rot / 16; i += 2 * h)
#pragma GCC unroll 32
                for (int j = i; j < i + h; j++) {
                    const nvf a = x[j], c = x[j + h];
                    x[j] = a + c;
                    x[j + h] = a - c;
                }
}

/* span_of in vectors, for the usual sizes (see span): each token's keys are decoded, rotated
 * back, put in their channels' order (one gather per vector), turned by RoPE and scored
 * without leaving registers, 16 tokens' dot products summed across lanes at once; values are decoded
 * straight into the block's buffer. */
RINLINE void span_vectors(const KJob *J, const float *q, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                          const int H, const int R, const int D, const int B, const int bits, const int rot,
                          const int G) {
    const int W = H * D, HR = H * R, NV = W / 16, DV = D / 16, S = value_span(H, D, rot);
    const float norm = 1.f / sqrtf((float)rot);
    const size_t bytes = sizeof(float) * ((size_t)B * W + (size_t)HR * B + (size_t)HR * S + 18 * (size_t)W
                                          + (size_t)HR * 16 * 16 + (size_t)HR * D);
    float *vb = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!vb) {  /* no memory: the call fails and the caller takes the reference */
        failed_rows(J, m_out, l_out, o, HR, D);
        return;
    }
    float *s = vb + (size_t)B * W, *ox = s + (size_t)HR * B;
    nvf *sc = (nvf *)(ox + (size_t)HR * S), *zc = sc + NV;
    float *flat = (float *)(zc + NV);  /* 16 tokens' keys in the rotated-back order */
    nvf (*part)[16] = (nvf (*)[16])(flat + 16 * (size_t)W);  /* 16 tokens' dot products per row */
    float *qb = (float *)(part + HR);  /* the query rows turned back by each block's first angles */
    float mr[KMAXH / 8], lr[KMAXH / 8];
    for (int r = 0; r < HR; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(ox, 0, sizeof(float) * HR * S);
    const Lanes L = lanes();
    nvf mean[KMAXH / 16];
    if (J->mean) memcpy(mean, J->mean, sizeof(float) * W);
    /* one head of at most PMAXD channels: its permute plan in registers */
    const int permuted = J->pmask != NULL && W <= PMAXD;
    __m512i pidx[PMAXD / 16];
    __mmask16 pmask[PMAXD / 16][PMAXD / 32];
    if (permuted)
        for (int u = 0; u < NV; u++) {
            pidx[u] = _mm512_loadu_si512(J->pidx + 16 * u);
            for (int p2 = 0; p2 < NV / 2; p2++) pmask[u][p2] = J->pmask[u * (NV / 2) + p2];
        }
    for (int b = b0; b < b1; b++) {
        /* RoPE at position p0 + t is RoPE at p0 after RoPE at t: q . R(p0 + t) k = (R(p0)^T q) .
         * (R(t) k), so each row is turned back once per block and each key by its offset's row */
        for (int h = 0; h < H; h++) {
            const float *c0 = J->rope + h * J->rope_hs + (long)b * B * 2 * D, *s0 = c0 + D;
            for (int r = 0; r < R; r++) {
                const float *qr = q + (long)(h * R + r) * D;
                float *out = qb + (long)(h * R + r) * D;
                for (int c = 0; c < D / 2; c++) {
                    out[c] = qr[c] * c0[c] + qr[c + D / 2] * s0[c];
                    out[c + D / 2] = qr[c + D / 2] * c0[c] - qr[c] * s0[c];
                }
            }
        }
        if (J->channel_keys)
            for (int j = 0; j < H; j++) {
                const uint8_t *s8 = KAT(J, uint8_t, KS, j, b, D);
                const int8_t *z8 = KAT(J, int8_t, KZ, j, b, D);
                float *a = (float *)sc + j * D, *z = (float *)zc + j * D;
                for (int c = 0; c < D; c++) { a[c] = RSCALE[s8[c]] * norm; z[c] = z8[c] * 0.125f * a[c]; }
            }
        for (int t0 = 0; t0 < B; t0 += 16) {
            if (!permuted)
                for (int tt = 0; tt < 16; tt++) {  /* 16 tokens rotated back first: a gather waits on */
                    nvf *x = (nvf *)(flat + (size_t)tt * W);  /* stores still in flight otherwise */
                    token_vectors(J, K, b, t0 + tt, J->channel_keys, x, sc, zc, norm, H, D, B, bits, G);
                    fwht_vectors(x, NV, rot, &L);
                }
            for (int tt = 0; tt < 16; tt++) {
                const int t = t0 + tt;
                const float *x = flat + (size_t)tt * W;
                nvf k[KMAXH / 16];
                if (permuted) {  /* one head: decoded, rotated back and put in order in registers */
                    nvf xv[PMAXD / 16];
                    token_vectors(J, K, b, t, J->channel_keys, xv, sc, zc, norm, H, D, B, bits, G);
                    fwht_vectors(xv, NV, rot, &L);
                    for (int u = 0; u < NV; u++) {  /* a pair of vectors at a time */
                        __m512 r = _mm512_permutex2var_ps((__m512)xv[0], pidx[u], (__m512)xv[1]);
                        for (int p2 = 1; p2 < NV / 2; p2++)
                            r = _mm512_mask_mov_ps(r, pmask[u][p2],
                                                   _mm512_permutex2var_ps((__m512)xv[2 * p2], pidx[u], (__m512)xv[2 * p2 + 1]));
                        k[u] = (nvf)r;
                    }
                } else if (J->inv) {  /* the channels back in their order */
                    for (int u = 0; u < NV; u++)
                        k[u] = (nvf)_mm512_i32gather_ps(_mm512_loadu_si512(J->inv + 16 * u), x, 4);
                } else {
                    memcpy(k, x, sizeof(float) * W);
                }
                if (J->mean)
                    for (int u = 0; u < NV; u++) k[u] += mean[u];
                const float *cs = J->off + (long)t * D, *sn = cs + D / 2;  /* offset t's angles */
                for (int h = 0; h < H; h++) {
                    const nvf *kh = k + h * DV;
                    nvf turned[RMAXD / 16];
                    for (int i = 0; i < DV / 2; i++) {
                        const nvf lo = kh[i], hi = kh[i + DV / 2], cv = loadv(cs + 16 * i), sv = loadv(sn + 16 * i);
                        turned[i] = lo * cv - hi * sv;
                        turned[i + DV / 2] = hi * cv + lo * sv;
                    }
                    for (int r = 0; r < R; r++) {
                        const float *qr = qb + (long)(h * R + r) * D;
                        nvf acc = loadv(qr) * turned[0];
                        for (int i = 1; i < DV; i++) acc += loadv(qr + 16 * i) * turned[i];
                        part[h * R + r][tt] = acc;
                    }
                }
            }
            for (int r = 0; r < HR; r++) storev(s + r * B + t0, sum16(part[r]));
        }
        for (int h = 0; h < H; h++)
            online_softmax_from(s + h * R * B, mr + h * R, lr + h * R, ox + (long)h * R * S, R, S, B,
                                b == b0 ? skip : 0);
        if (H == 1 && R * DV <= 16) {  /* one head, few rows: each token's values decoded and summed in registers */
            nvf acc[16], val[16];
            for (int i = 0; i < R * DV; i++) acc[i] = loadv(ox + 16 * i);
            for (int t = 0; t < B; t++) {
                token_vectors(J, V, b, t, 0, val, sc, zc, norm, H, D, B, bits, G);
                for (int r = 0; r < R; r++) {
                    const float p = s[r * B + t];
                    for (int i = 0; i < DV; i++) acc[r * DV + i] += p * val[i];
                }
            }
            for (int i = 0; i < R * DV; i++) storev(ox + 16 * i, acc[i]);
            continue;
        }
        for (int t = 0; t < B; t++)
            token_vectors(J, V, b, t, 0, (nvf *)(vb + (size_t)t * W), sc, zc, norm, H, D, B, bits, G);
        sum_values(ox, s, vb, H, R, D, B, S);
    }
    finish_rows(J, mr, lr, ox, m_out, l_out, o, HR, R, D, S, rot, &L);
    free(vb);
}
#endif

/* all heads of J over blocks [b0, b1) (one head when J is a head's own view) */
static void span_heads(const KJob *J, const float *q, int b0, int b1, int skip, float *m, float *l, float *o) {
    const int H = J->n_kv, R = J->rows, D = J->d, B = J->block, bits = J->bits, rot = J->rotate, G = J->group;
#ifdef __AVX512F__
    /* in vectors: whole vectors per RoPE half, per plane of packed codes and per group; 16-token
     * steps */
    if (D % 32 == 0 && (D * bits / 8) % 16 == 0 && rot % 16 == 0 && G % 16 == 0 && B % 16 == 0) {
#define SHAPE(hh, r, d, bb, k) \
        if (H == hh && R == r && D == d && B == bb && bits == k && rot == 64 && G == 64) { \
            span_vectors(J, q, b0, b1, skip, m, l, o, hh, r, d, bb, k, 64, 64); return; }
        SHAPE(1, 3, 64, 64, 2) SHAPE(1, 3, 64, 64, 4)       /* SmolLM2, heads apart: 3 query heads a KV head */
        SHAPE(3, 3, 64, 64, 2) SHAPE(3, 3, 64, 64, 4)       /* SmolLM2: 9 query heads over 3 KV heads */
        SHAPE(1, 4, 256, 64, 2) SHAPE(1, 4, 256, 64, 4)     /* Gemma 3: 4 query heads over 1 KV head */
#undef SHAPE
        span_vectors(J, q, b0, b1, skip, m, l, o, H, R, D, B, bits, rot, G);
        return;
    }
#endif
    span_of(J, q, b0, b1, skip, m, l, o, H, R, D, B, bits, rot);
}

/* run_spans' and batched.c's task: KV head h of a run whose heads are apart, else all heads (h
 * is then always 0). A head's view of the job has its fields, RoPE rows, means and orders
 * moved to that head (every field is bytes). */
static void span(const void *job, const float *q, int h, int b0, int b1, int skip, float *m, float *l, float *o) {
    const KJob *J = job;
    if (!J->apart) {
        span_heads(J, q, b0, b1, skip, m, l, o);
        return;
    }
    const void *p[NFIELDS];
    for (int f = 0; f < NFIELDS; f++) p[f] = (const uint8_t *)J->p[f] + h * J->hs[f];
    KJob one = *J;
    const int D = J->d;
    one.n_kv = 1;
    one.p = p;
    one.rope = J->rope + h * J->rope_hs;
    one.inv = J->linv ? J->linv + h * D : NULL;
    one.pidx = J->pidx ? J->pidx + h * D : NULL;
    one.pmask = J->pmask ? J->pmask + h * (D / 16) * (D / 32) : NULL;
    one.mean = J->mean ? J->mean + h * D : NULL;
    one.vinv = J->vinv ? J->vinv + h * D : NULL;
    one.failed = 0;
    span_heads(&one, q, b0, b1, skip, m, l, o);
    if (one.failed) ((KJob *)J)->failed = 1;
}

/* Whether the heads' channels never meet: rotation runs inside a head (rot | D) and the key
 * order moves no channel to another head. Then each KV head is its own task. */
static int heads_apart(const int H, const int D, const int rot, const int32_t *inv) {
    if (D % rot) return 0;
    if (inv)
        for (int c = 0; c < H * D; c++)
            if (inv[c] / D != c / D) return 0;
    return 1;
}

/* The job of a run of blocks, in one allocation (free() frees it): the sizes and pointers, the
 * RoPE offsets and, for heads apart, each head's own key order and its permute plan; NULL when
 * the sizes are outside what this kernel handles, a block's positions are not consecutive, or
 * memory runs out. */
static KJob *job_of(int n_kv, int rows, int d, int bits, int group, int block, int n_blocks, int rotate,
                    int channel_keys, const void *const *ptrs, const long *strides, const float *rope,
                    long rope_hs, const int32_t *inv, const float *mean, const int32_t *vinv) {
    const int w = n_kv * d;
    if (d > RMAXD || d % 2 || rows > RMAXR || block > RMAXB || w > KMAXH || n_kv * rows > KMAXH / 8
        || (bits != 2 && bits != 4) || group < 1 || d % group || (d * bits) % 8 || n_blocks < 1
        || rotate < 2 || rotate > 2 * RMAXD || (rotate & (rotate - 1)) || w % rotate || (vinv && d % rotate))
        return NULL;
    rscale_table();
    const int apart = heads_apart(n_kv, d, rotate, inv), plan = apart && inv && d % 32 == 0 && d <= PMAXD;
    const size_t off_n = (size_t)block * d, masks = plan ? (size_t)n_kv * (d / 16) * (d / 32) : 0;
    const size_t bytes = sizeof(KJob) + sizeof(float) * off_n + sizeof(int32_t) * (apart && inv ? 2 * (size_t)w : 0)
                         + sizeof(uint16_t) * masks;
    KJob *J = malloc(bytes);
    if (!J) return NULL;
    float *off = (float *)(J + 1);
    int32_t *linv = (int32_t *)(off + off_n), *pidx = linv + w;
    uint16_t *pmask = (uint16_t *)(pidx + w);
    if (rope_offsets(rope, rope_hs, rope_hs ? n_kv : 1, n_blocks, block, d, off)) { free(J); return NULL; }
    *J = (KJob){n_kv, rows, d, bits, group, block, n_blocks, rotate, channel_keys, ptrs, strides, rope, rope_hs,
                off, inv, mean, vinv, apart, NULL, NULL, NULL, 0};
    if (apart && inv) {
        for (int c = 0; c < w; c++) linv[c] = inv[c] - c / d * d;
        J->linv = linv;
    }
    if (plan) {  /* output vector u of a head takes lane linv & 31 of pair linv / 32 */
        const int nv = d / 16, np = d / 32;
        memset(pmask, 0, sizeof(uint16_t) * masks);
        for (int c = 0; c < w; c++) {
            const int h = c / d, u = c % d / 16, lane = c % 16;
            pidx[c] = linv[c] & 31;
            pmask[((size_t)h * nv + u) * np + linv[c] / 32] |= (uint16_t)(1u << lane);
        }
        J->pidx = pidx;
        J->pmask = pmask;
    }
    return J;
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles or memory runs out (the
 * caller falls back). */
int kvtier_rotatekv_attend(const float *q, int n_kv, int rows, int d, int bits, int group, int block,
                           int n_blocks, int rotate, int channel_keys, const void *const *ptrs,
                           const long *strides, const float *rope, long rope_hs, const int32_t *inv,
                           const float *mean, const int32_t *vinv, float *m, float *l, float *o, int threads) {
    KJob *J = job_of(n_kv, rows, d, bits, group, block, n_blocks, rotate, channel_keys, ptrs, strides, rope,
                     rope_hs, inv, mean, vinv);
    if (!J) return 1;
    const int rc = (J->apart ? run_spans(J, span, q, n_kv, rows, d, n_blocks, m, l, o, threads)
                             : run_spans(J, span, q, 1, n_kv * rows, d, n_blocks, m, l, o, threads)) || J->failed;
    free(J);
    return rc;
}

/* The same run as a job for batched.c's SPAN parts (one KV head per task: only runs whose heads
 * are apart), or NULL; and its span function. A task that runs out of memory leaves its
 * head's pieces empty (m = -inf). */
void *kvtier_rotatekv_job(int n_kv, int rows, int d, int bits, int group, int block, int n_blocks, int rotate,
                          int channel_keys, const void *const *ptrs, const long *strides, const float *rope,
                          long rope_hs, const int32_t *inv, const float *mean, const int32_t *vinv) {
    KJob *J = job_of(n_kv, rows, d, bits, group, block, n_blocks, rotate, channel_keys, ptrs, strides, rope,
                     rope_hs, inv, mean, vinv);
    if (J && !J->apart) { free(J); return NULL; }
    return J;
}

void *kvtier_rotatekv_span(void) { return (void *)span; }
