/* Decode attention on the `ovp` codec's blocks (OliVe's outlier-victim pairs), in fp32.
 *
 * One call covers one run of consecutive blocks of one layer, all KV heads. Per KV head and
 * block of B tokens:
 *   keys    D rows (one per channel) of B/2 pair bytes, byte j holding tokens 2j and 2j+1;
 *           one fp16 scale and one fp16 centre per channel;
 *   values  B rows (one per token) of D/2 pair bytes, byte j holding channels 2j and 2j+1;
 *           one fp16 scale per token.
 * A pair byte stands for two values in scale steps, `pairs[2 * byte]` and `pairs[2 * byte + 1]`
 * (int4 normals, or an abfloat outlier beside its zeroed victim: kvtier.kv.codecs.ovp). The
 * key scales and centres move to the query: a score is sum(q * centre) + sum((q * scale) *
 * step). The keys are decoded channel by channel, so the scores run along the tokens. For the
 * R query rows of a head (pre-scaled) it returns the softmax pieces m, l, o that
 * kvtier.attention.blockwise.merge combines; work is split over (head, run of blocks) tasks.
 * kvtier.kv.codecs.ovp.Ovp.attend_torch is the reference this is tested against.
 */
#include "spans.h"

enum { K, KS, KC, V, VS, OFIELDS };  /* the fields, in Python's order */
enum { VICTIM = 8 };  /* the nibble whose neighbour is an outlier */

typedef struct {
    int n_kv, rows, d, block, n_blocks;
    const void *const *p; const long *hs;  /* each field's base and head stride (elements) */
    const float *pairs;                    /* (256, 2): the two steps of each pair byte */
    int factored;                          /* pairs_factor() held: normal, outlier are its tables */
    float normal[16], outlier[16];
} OJob;

#define OAT(J, T, f, h, b, per) ((const T *)(J)->p[f] + (h) * (J)->hs[f] + (long)(b) * (per))

/* n pair bytes into 2n values, one byte at a time through the (256, 2) table */
RINLINE void pairs_of(const uint8_t *restrict bytes, const float *restrict pairs, float *restrict out, const int n) {
    for (int j = 0; j < n; j++) {
        const float *two = pairs + 2 * bytes[j];
        out[2 * j] = two[0];
        out[2 * j + 1] = two[1];
    }
}

/* Whether the pair table is OliVe's: a nibble is a normal value unless its neighbour is the
 * victim code, then it is an outlier (kvtier.kv.codecs.ovp._tables). Then each nibble decodes
 * by two 16-entry tables, normal[x] = pairs[x][0] and outlier[x] = pairs[x | 0x80][0]. */
static int pairs_factor(const float *pairs, float *normal, float *outlier) {
    for (int x = 0; x < 16; x++) { normal[x] = pairs[2 * x]; outlier[x] = pairs[2 * (x | 0x80)]; }
    for (int byte = 0; byte < 256; byte++) {
        const int lo = byte & 15, hi = byte >> 4;
        if (pairs[2 * byte] != (hi == VICTIM ? outlier[lo] : normal[lo])
            || pairs[2 * byte + 1] != (lo == VICTIM ? outlier[hi] : normal[hi]))
            return 0;
    }
    return 1;
}

#ifdef __AVX512F__
/* 16 pair bytes into 32 values, in order: both nibbles looked up in registers, the outlier
 * table where the neighbour is the victim, then the two halves interleaved */
RINLINE void pairs16(const uint8_t *bytes, const __m512 normal, const __m512 outlier, float *out) {
    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    const __m512i lo = _mm512_and_si512(x, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(x, 4);
    const __m512i victim = _mm512_set1_epi32(VICTIM);
    const __m512 a = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(lo, normal),
                                                _mm512_cmpeq_epi32_mask(hi, victim), lo, outlier);
    const __m512 b = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(hi, normal),
                                                _mm512_cmpeq_epi32_mask(lo, victim), hi, outlier);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(a, first, b));
    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(a, _mm512_add_epi32(first, _mm512_set1_epi32(8)), b));
}
#endif

/* n pair bytes into 2n values: 16 bytes at a time when the table factors, else by table */
RINLINE void decode_pairs(const uint8_t *restrict bytes, const OJob *J, float *restrict out, const int n) {
#ifdef __AVX512F__
    if (J->factored && n % 16 == 0) {
        const __m512 normal = _mm512_loadu_ps(J->normal), outlier = _mm512_loadu_ps(J->outlier);
        for (int j = 0; j < n; j += 16) pairs16(bytes + j, normal, outlier, out + 2 * j);
        return;
    }
#endif
    pairs_of(bytes, J->pairs, out, n);
}

/* one head's pieces over blocks [b0, b1); R, D and B are compile-time constants in the
 * specialised calls of span() */
RINLINE void span_of(const OJob *J, const float *q, int h, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                     const int R, const int D, const int B) {
    float kb[RMAXD * RMAXB], vb[RMAXB * RMAXD], s[RMAXR * RMAXB], qs[RMAXR * RMAXD], mr[RMAXR], lr[RMAXR];
    for (int r = 0; r < R; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(o, 0, sizeof(float) * R * D);
    for (int b = b0; b < b1; b++) {
        const _Float16 *ks = OAT(J, _Float16, KS, h, b, D), *kc = OAT(J, _Float16, KC, h, b, D);
        const uint8_t *kq = OAT(J, uint8_t, K, h, b, D * B / 2);
        for (int c = 0; c < D; c++) decode_pairs(kq + (long)c * (B / 2), J, kb + c * B, B / 2);
        for (int r = 0; r < R; r++) {
            float base = 0.f;
            for (int c = 0; c < D; c++) {
                base += q[r * D + c] * (float)kc[c];
                qs[r * D + c] = q[r * D + c] * (float)ks[c];
            }
            float *sr = s + r * B;
            for (int t = 0; t < B; t++) sr[t] = base;
            for (int c = 0; c < D; c++) {
                const float a = qs[r * D + c], *row = kb + c * B;
                for (int t = 0; t < B; t++) sr[t] += a * row[t];
            }
        }
        online_softmax_from(s, mr, lr, o, R, D, B, b == b0 ? skip : 0);
        const _Float16 *vs = OAT(J, _Float16, VS, h, b, B);
        const uint8_t *vq = OAT(J, uint8_t, V, h, b, B * D / 2);
        for (int t = 0; t < B; t++) decode_pairs(vq + (long)t * (D / 2), J, vb + t * D, D / 2);
        for (int r = 0; r < R; r++) {
            float *orow = o + r * D;
            for (int t = 0; t < B; t++) {
                const float w = s[r * B + t] * (float)vs[t], *row = vb + t * D;
                for (int c = 0; c < D; c++) orow[c] += w * row[c];
            }
        }
    }
    for (int r = 0; r < R; r++) { m_out[r] = mr[r]; l_out[r] = lr[r]; }
}

static void span(const void *job, const float *q, int h, int b0, int b1, int skip, float *m, float *l, float *o) {
    const OJob *J = job;
    const int R = J->rows, D = J->d, B = J->block;
#define SHAPE(r, d, bb) if (R == r && D == d && B == bb) { span_of(J, q, h, b0, b1, skip, m, l, o, r, d, bb); return; }
    SHAPE(3, 64, 64)    /* SmolLM2: 9 query heads over 3 KV heads */
    SHAPE(4, 256, 64)   /* Gemma 3: 4 query heads over 1 KV head */
#undef SHAPE
    span_of(J, q, h, b0, b1, skip, m, l, o, R, D, B);
}

/* The job of a run of blocks: 0, or 1 when the sizes are outside what this kernel handles. */
static int job_of(OJob *J, int n_kv, int rows, int d, int block, int n_blocks, const void *const *ptrs,
                  const long *strides, const float *pairs) {
    if (d > RMAXD || rows > RMAXR || block > RMAXB || d % 2 || block % 2 || n_blocks < 1)
        return 1;
    *J = (OJob){n_kv, rows, d, block, n_blocks, ptrs, strides, pairs, 0, {0}, {0}};
    J->factored = pairs_factor(pairs, J->normal, J->outlier);
    return 0;
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles (the caller falls back). */
int kvtier_ovp_attend(const float *q, int n_kv, int rows, int d, int block, int n_blocks, const void *const *ptrs,
                      const long *strides, const float *pairs, float *m, float *l, float *o, int threads) {
    OJob J;
    if (job_of(&J, n_kv, rows, d, block, n_blocks, ptrs, strides, pairs)) return 1;
    return run_spans(&J, span, q, n_kv, rows, d, n_blocks, m, l, o, threads);
}

/* The same run as a job for batched.c's SPAN parts, or NULL; and its span function. */
void *kvtier_ovp_job(int n_kv, int rows, int d, int block, int n_blocks, const void *const *ptrs,
                     const long *strides, const float *pairs) {
    OJob J;
    return job_copy(&J, sizeof J, job_of(&J, n_kv, rows, d, block, n_blocks, ptrs, strides, pairs));
}

void *kvtier_ovp_span(void) { return (void *)span; }
