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
 * never formed. With AVX-512 VBMI2 (head sizes a multiple of 16) a row is instead expanded,
 * 16 channels at a time, into an L1-sized block buffer: each 16 channels' bitmap bits are
 * picked from the planes by one byte permute and test, and their kept values are spread to
 * the kept lanes by one expand, so a block is scored and summed as a dense one is, with no
 * walk per channel. For the R query rows of a head (pre-scaled) it returns the softmax pieces
 * m, l, o that kvtier.attention.blockwise.merge combines; work is split over (head, run of
 * blocks) tasks. kvtier.kv.codecs.sparse.Sparse.attend_torch is the reference this is tested
 * against.
 */
#include "spans.h"

enum { KM, KV, VM, VV, SFIELDS };  /* the fields, in Python's order */

typedef struct {
    int n_kv, rows, d, nnz, bf16, block, n_blocks;
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

#if defined(__AVX512VBMI2__) && defined(__AVX512VBMI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SP_EXPAND 1
/* for each run of 16 channels: the bitmap byte and the bit of each channel */
typedef struct { __m256i byte[RMAXD / 16]; __m128i bit[RMAXD / 16]; } Chunks;

static Chunks chunks_of(const int D) {
    Chunks C;
    const int m = D / 8;
    for (int u = 0; u < D / 16; u++) {
        uint8_t byte[32] = {0}, bit[16];
        for (int e = 0; e < 16; e++) {
            const int c = 16 * u + e;
            byte[e] = (uint8_t)(c % m);
            bit[e] = (uint8_t)(1u << (c / m));
        }
        C.byte[u] = _mm256_loadu_si256((const __m256i *)byte);
        C.bit[u] = _mm_loadu_si128((const __m128i *)bit);
    }
    return C;
}

/* one row as D fp32 channels, the dropped ones zero: map (D/8 bytes, planes), val (kept
 * values in channel order, fp16 or bf16 bits) */
RINLINE void expand_row(const uint8_t *restrict map, const uint16_t *restrict val, float *restrict out,
                        const Chunks *C, const int D, const int bf16) {
    const int m = D / 8;
    const __m256i bytes = _mm256_maskz_loadu_epi8(m >= 32 ? ~0u : (1u << m) - 1, map);
    int at = 0;
    for (int u = 0; u < D / 16; u++) {
        const __m128i sel = _mm256_castsi256_si128(_mm256_permutexvar_epi8(C->byte[u], bytes));
        const __mmask16 keep = _mm_test_epi8_mask(sel, C->bit[u]);
        const int n = __builtin_popcount(keep);
        /* a masked load never reads past the row's kept values */
        const __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), val + at);
        const __m256i w = _mm256_maskz_expand_epi16(keep, raw);
        const __m512 f = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16))
                              : _mm512_cvtph_ps(w);
        _mm512_storeu_ps(out + 16 * u, f);
        at += n;
    }
}

/* span_of through expanded rows: a block's keys are expanded and scored, its values expanded
 * and summed under the weights */
RINLINE void span_expanded(const SJob *J, const float *q, int h, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                           const int R, const int D, const int B, const int N) {
    float kb[RMAXB * RMAXD], s[RMAXR * RMAXB], mr[RMAXR], lr[RMAXR];
    const Chunks C = chunks_of(D);
    for (int r = 0; r < R; r++) { mr[r] = -FLT_MAX; lr[r] = 0.f; }
    memset(o, 0, sizeof(float) * R * D);
    for (int b = b0; b < b1; b++) {
        const uint8_t *km = SAT(J, uint8_t, KM, h, b, B * (D / 8));
        const uint16_t *kv = SAT(J, uint16_t, KV, h, b, B * N);
        for (int t = 0; t < B; t++) expand_row(km + (long)t * (D / 8), kv + (long)t * N, kb + t * D, &C, D, J->bf16);
        block_scores(kb, q, s, R, D, B);
        online_softmax_from(s, mr, lr, o, R, D, B, b == b0 ? skip : 0);
        const uint8_t *vm = SAT(J, uint8_t, VM, h, b, B * (D / 8));
        const uint16_t *vv = SAT(J, uint16_t, VV, h, b, B * N);
        for (int t = 0; t < B; t++) expand_row(vm + (long)t * (D / 8), vv + (long)t * N, kb + t * D, &C, D, J->bf16);
        weighted_sum(o, s, kb, R, D, B, D);
    }
    for (int r = 0; r < R; r++) { m_out[r] = mr[r]; l_out[r] = lr[r]; }
}
#endif

/* one head's pieces over blocks [b0, b1); R, D, B and nnz are compile-time constants in the
 * specialised calls of span() */
RINLINE void span_of(const SJob *J, const float *q, int h, int b0, int b1, int skip, float *m_out, float *l_out, float *o,
                     const int R, const int D, const int B, const int N) {
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
        online_softmax_from(s, mr, lr, o, R, D, B, b == b0 ? skip : 0);
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

static void span(const void *job, const float *q, int h, int b0, int b1, int skip, float *m, float *l, float *o) {
    const SJob *J = job;
    const int R = J->rows, D = J->d, B = J->block, N = J->nnz;
#ifdef SP_EXPAND
    if (D % 16 == 0) {
#define SHAPE(r, d, bb) if (R == r && D == d && B == bb) { span_expanded(J, q, h, b0, b1, skip, m, l, o, r, d, bb, N); return; }
        SHAPE(3, 64, 64)    /* SmolLM2: 9 query heads over 3 KV heads */
        SHAPE(4, 256, 64)   /* Gemma 3: 4 query heads over 1 KV head */
#undef SHAPE
        span_expanded(J, q, h, b0, b1, skip, m, l, o, R, D, B, N);
        return;
    }
#endif
#define SHAPE(r, d, bb, n) if (R == r && D == d && B == bb && N == n) { span_of(J, q, h, b0, b1, skip, m, l, o, r, d, bb, n); return; }
    SHAPE(3, 64, 64, 32)    /* SmolLM2 at the default ratio 0.5: 9 query heads over 3 KV heads */
    SHAPE(4, 256, 64, 128)  /* Gemma 3: 4 query heads over 1 KV head */
#undef SHAPE
    span_of(J, q, h, b0, b1, skip, m, l, o, R, D, B, N);
}

/* The job of a run of blocks: 0, or 1 when the sizes are outside what this kernel handles. */
static int job_of(SJob *J, int n_kv, int rows, int d, int nnz, int bf16, int block, int n_blocks,
                  const void *const *ptrs, const long *strides) {
    if (d > RMAXD || d % 8 || rows > RMAXR || block > RMAXB || nnz < 1 || nnz > d || n_blocks < 1)
        return 1;
    *J = (SJob){n_kv, rows, d, nnz, bf16, block, n_blocks, ptrs, strides};
    return 0;
}

/* Returns 0, or 1 when the sizes are outside what this kernel handles (the caller falls back).
 * Every row's bitmap must hold exactly nnz channels (the codec's invariant). */
int kvtier_sparse_attend(const float *q, int n_kv, int rows, int d, int nnz, int bf16, int block, int n_blocks,
                         const void *const *ptrs, const long *strides, float *m, float *l, float *o, int threads) {
    SJob J;
    if (job_of(&J, n_kv, rows, d, nnz, bf16, block, n_blocks, ptrs, strides)) return 1;
    return run_spans(&J, span, q, n_kv, rows, d, n_blocks, m, l, o, threads);
}

/* The same run as a job for batched.c's SPAN parts, or NULL; and its span function. */
void *kvtier_sparse_job(int n_kv, int rows, int d, int nnz, int bf16, int block, int n_blocks,
                        const void *const *ptrs, const long *strides) {
    SJob J;
    return job_copy(&J, sizeof J, job_of(&J, n_kv, rows, d, nnz, bf16, block, n_blocks, ptrs, strides));
}

void *kvtier_sparse_span(void) { return (void *)span; }
