/* y = x W^T with int8 weights and int8 activations (--weights w8a8, kvtier.weights.w8a8).
 *
 * Held, per matrix W (N, K):
 *   wp     the int8 codes of W' = W diag(s), each row scaled per chunk of 64 inputs, packed as
 *          AMX B tiles: N rounded up to 16 (blocks), K up to 64 (chunks); block b, chunk c is
 *          16 rows (quads of K) x 64 bytes, wp[b][c][kq][4 n + j] = code[16 b + n][64 c + 4 kq + j],
 *          zeros past N and K;
 *   ws     (blocks, chunks, 16) fp32 the scale of each row's chunk (a chunk holding an outlier
 *          channel does not coarsen the row's other chunks); wsum (blocks, chunks, 16) int32 the
 *          sum of the codes of each row's chunk;
 *   z, inv_s (K) fp32 each input channel's centre and 1 / scale (OutlierTune: the activation's
 *          per-channel scale is folded into W', its centre into the bias);
 *   bias   (N) fp32: W z.
 * A call quantizes each row of x: x' = (x - z) * inv_s, r = 127 / max|x'| (1 for an all-zero
 * row), q = round_half_even(x' * r) (|q| <= 127), then, chunk by chunk in order,
 *   sum[m, n] += (float)(sum over the chunk's k of q[m, k] code[n, k]) * ws[n, chunk],
 *   y[m, n] = sum[m, n] * (1 / r[m]) + bias[n].
 * The int32 sums are exact, so the paths below give the same numbers: AMX's int8 tiles (A: 16
 * rows of q, B: a block's chunk, TDPBSSD), or AVX512-VNNI's vpdpbusd (q + 128 as unsigned bytes
 * against 16 rows' quads; 128 * wsum taken back out). The PyTorch reference beside it is
 * kvtier.weights.w8a8.W8A8Linear.reference; tests/test_weights.py checks the two agree.
 * Without either instruction set the entry point returns -1 and the caller takes the reference.
 * Compiled without -ffast-math's shortcuts and without contracting products into sums: the
 * rounding and the order of the float operations are the reference's. */
#pragma GCC optimize("no-fast-math", "fp-contract=off")
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

/* Row m of x quantized into q (kp bytes, zero past k); returns 1 / r.  tmp: k + 16 floats. */
static float quantize_row(const void *x, int bf16, int64_t k, int64_t kp, const float *z, const float *inv_s,
                          float *tmp, int8_t *q) {
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 in = k - i >= 16 ? 0xffff : (__mmask16)((1u << (k - i)) - 1);
        const __m512 v = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, (const uint16_t *)x + i)), 16))
                              : _mm512_maskz_loadu_ps(in, (const float *)x + i);
        const __m512 xs = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_maskz_loadu_ps(in, z + i)),
                                        _mm512_maskz_loadu_ps(in, inv_s + i));
        _mm512_storeu_ps(tmp + i, xs);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(xs)); /* masked lanes are 0 */
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const float r = amax > 0.0f ? 127.0f / amax : 1.0f;
    const __m512 vr = _mm512_set1_ps(r);
    for (int64_t i = 0; i < kp; i += 16) {
        const __mmask16 in = k - i >= 16 ? 0xffff : k > i ? (__mmask16)((1u << (k - i)) - 1) : 0;
        /* round to nearest even; |x' r| <= 127 */
        const __m512i c = _mm512_maskz_cvtps_epi32(in, _mm512_mul_ps(_mm512_loadu_ps(tmp + i), vr));
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(c));
    }
    return 1.0f / r;
}

/* Row m0 + r of y, columns n0 .. n0 + nn - 1: (sums under the weight scales) * (1 / r) + bias. */
static inline void finish_row(__m512 sum, float t, const float *bias, int64_t nn, void *y, int bf16, int64_t at) {
    const __mmask16 k = (__mmask16)((1u << nn) - 1);
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(sum, _mm512_set1_ps(t)), _mm512_maskz_loadu_ps(k, bias));
    if (bf16) _mm256_mask_storeu_epi16((uint16_t *)y + at, k, (__m256i)_mm512_cvtneps_pbh(v));
    else _mm512_mask_storeu_ps((float *)y + at, k, v);
}

int kvtier_w8a8_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *wp, const float *ws,
                       const int32_t *wsum, const float *z, const float *inv_s, const float *bias, int64_t N,
                       void *y, int threads) {
    const int64_t kp = (K + 63) / 64 * 64, chunks = kp / 64, blocks = (N + 15) / 16, mp = (M + 15) / 16 * 16;
    int8_t *q = aligned_alloc(64, (size_t)(mp * kp));
    float *t = malloc(sizeof(float) * (size_t)mp), *tmp = malloc(sizeof(float) * (size_t)((kp + 16) * threads));
    if (!q || !t || !tmp) {
        free(q); free(t); free(tmp);
        return -1;
    }
    memset(q + M * kp, 0, (size_t)((mp - M) * kp));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++)
        t[m] = quantize_row((const char *)x + m * K * (x_bf16 ? 2 : 4), x_bf16, K, kp, z, inv_s,
                            tmp + omp_get_thread_num() * (kp + 16), q + m * kp);
    free(tmp);
#ifdef KVT_AMX
    const int amx = M > 1 && amx_permitted();
#else
    const int amx = 0;
#endif
#pragma omp parallel num_threads(threads)
    {
#ifdef KVT_AMX
        TileConfig saved;
        if (amx) amx_begin(&saved, 8, NULL); /* 0-3: C (four chunks), 4-5: A (q), 6-7: B (a block's chunks) */
        int32_t c[4][16][16] __attribute__((aligned(64)));
#endif
        /* each thread its share of the output columns; on the tiles, 16 rows of x at a time
         * across the whole share (their codes stay in L1 while the weights stream: 4.4 -> 3.1 ms
         * for 2,060 rows of SmolLM2's gate/up matrix against blocks outer) */
        const int nt = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t b_first = blocks * me / nt, b_end = blocks * (me + 1) / nt;
        for (int64_t mo = 0; mo < (amx ? M : 1); mo += 16)
        for (int64_t b = b_first; b < b_end; b++) {
            const int8_t *wb = wp + b * chunks * 1024;
            const float *wsb = ws + b * chunks * 16;
            const int64_t n0 = 16 * b, nn = N - n0 < 16 ? N - n0 : 16;
#ifdef KVT_AMX
            if (amx) {
                const int64_t m0 = mo, mm = M - m0 < 16 ? M - m0 : 16;
                const int8_t *qb = q + m0 * kp;
                __m512 sum[16];
                for (int r = 0; r < 16; r++) sum[r] = _mm512_setzero_ps();
                /* four chunks in flight (tiles 0-3), then their int32 sums out under their
                 * weight scales, in chunk order */
                for (int64_t ch0 = 0; ch0 < chunks; ch0 += 4) {
                    const int nc = chunks - ch0 < 4 ? (int)(chunks - ch0) : 4;
                    if (m0 == 0) /* the weights stream from memory: ask for the next four chunks */
                        for (int line = 0; line < 64; line++)
                            _mm_prefetch((const char *)(wb + (ch0 + 4) * 1024 + 64 * line), _MM_HINT_T0);
#define W8A8_STEP(C, A, B, j)                                        \
                    _tile_zero(C);                               \
                    _tile_loadd(A, qb + 64 * (ch0 + j), kp);     \
                    _tile_loadd(B, wb + (ch0 + j) * 1024, 64);   \
                    _tile_dpbssd(C, A, B);
                    W8A8_STEP(0, 4, 6, 0)
                    if (nc > 1) { W8A8_STEP(1, 5, 7, 1) }
                    if (nc > 2) { W8A8_STEP(2, 4, 6, 2) }
                    if (nc > 3) { W8A8_STEP(3, 5, 7, 3) }
#undef W8A8_STEP
                    _tile_stored(0, c[0], 64);
                    if (nc > 1) _tile_stored(1, c[1], 64);
                    if (nc > 2) _tile_stored(2, c[2], 64);
                    if (nc > 3) _tile_stored(3, c[3], 64);
                    for (int j = 0; j < nc; j++) {
                        const __m512 wsv = _mm512_load_ps(wsb + 16 * (ch0 + j));
                        for (int r = 0; r < mm; r++)
                            sum[r] = _mm512_add_ps(sum[r], _mm512_mul_ps(_mm512_cvtepi32_ps(
                                                                    _mm512_load_si512(c[j][r])), wsv));
                    }
                }
                for (int r = 0; r < mm; r++) finish_row(sum[r], t[m0 + r], bias + n0, nn, y, x_bf16, (m0 + r) * N + n0);
                continue;
            }
#endif
            const __m512i bias128 = _mm512_set1_epi8((char)0x80);
            for (int64_t m = 0; m < M; m++) {
                const int8_t *qm = q + m * kp;
                __m512 sum = _mm512_setzero_ps();
                for (int64_t ch = 0; ch < chunks; ch++) {
                    const int8_t *wc = wb + ch * 1024;
                    if (m == 0) /* the weights stream from memory: ask for them two chunks ahead */
                        for (int line = 0; line < 16; line++)
                            _mm_prefetch((const char *)(wc + 2 * 1024 + 64 * line), _MM_HINT_T0);
                    /* 16 quads of q (+128: unsigned) against 16 rows' quads */
                    int32_t quads[16] __attribute__((aligned(64)));
                    _mm512_store_si512(quads, _mm512_xor_si512(_mm512_loadu_si512(qm + 64 * ch), bias128));
                    __m512i acc = _mm512_setzero_si512();
                    for (int kq = 0; kq < 16; kq++)
                        acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(quads[kq]), _mm512_load_si512(wc + 64 * kq));
                    acc = _mm512_sub_epi32(acc, _mm512_slli_epi32(_mm512_load_si512(wsum + (b * chunks + ch) * 16), 7));
                    sum = _mm512_add_ps(sum, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_load_ps(wsb + 16 * ch)));
                }
                finish_row(sum, t[m], bias + n0, nn, y, x_bf16, m * N + n0);
            }
        }
#ifdef KVT_AMX
        if (amx) amx_end(&saved);
#endif
    }
    free(q);
    free(t);
    return 0;
}

#else

int kvtier_w8a8_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *wp, const float *ws,
                       const int32_t *wsum, const float *z, const float *inv_s, const float *bias, int64_t N,
                       void *y, int threads) {
    (void)x; (void)x_bf16; (void)M; (void)K; (void)wp; (void)ws; (void)wsum; (void)z; (void)inv_s; (void)bias;
    (void)N; (void)y; (void)threads;
    return -1;
}

#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
/* The weights held, W' / s (N, K), as bf16: out[n][k] = code[n][k] * ws[n][chunk] * inv_s[k],
 * rounded once, for a long prefill chunk's blocked bf16 matmul (kvtier.weights.w8a8: x in bf16,
 * not quantized). The reference is W8A8Linear.dense(). */
int kvtier_w8a8_dequant_bf16(const int8_t *wp, const float *ws, const float *inv_s, int64_t N, int64_t K,
                             uint16_t *out, int threads) {
    if (N < 1 || K < 1) return -1;
    const int64_t blocks = (N + 15) / 16, chunks = (K + 63) / 64;
    /* a row's 16 quads of a chunk are 64 bytes apart in the tile */
    const __m512i quad = _mm512_setr_epi32(0, 64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t ch = 0; ch < chunks; ch++) {
            const int8_t *tile = wp + (b * chunks + ch) * 1024;
            const int64_t k0 = 64 * ch, width = K - k0 < 64 ? K - k0 : 64;
            for (int n = 0; n < 16 && 16 * b + n < N; n++) {
                int8_t row[64] __attribute__((aligned(64))); /* row n's 64 codes of the chunk */
                _mm512_store_si512(row, _mm512_i32gather_epi32(quad, (const void *)(tile + 4 * n), 1));
                const __m512 scale = _mm512_set1_ps(ws[(b * chunks + ch) * 16 + n]);
                for (int part = 0; part < 4 && 16 * part < width; part++) {
                    const __mmask16 in = width - 16 * part >= 16 ? 0xffff : (__mmask16)((1u << (width - 16 * part)) - 1);
                    const __m128i bytes = _mm_load_si128((const __m128i *)(row + 16 * part));
                    const __m512 w = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale),
                                                   _mm512_maskz_loadu_ps(in, inv_s + k0 + 16 * part));
                    _mm256_mask_storeu_epi16(out + (16 * b + n) * K + k0 + 16 * part, in, (__m256i)_mm512_cvtneps_pbh(w));
                }
            }
        }
    return 0;
}

#else

int kvtier_w8a8_dequant_bf16(const int8_t *wp, const float *ws, const float *inv_s, int64_t N, int64_t K,
                             uint16_t *out, int threads) {
    (void)wp; (void)ws; (void)inv_s; (void)N; (void)K; (void)out; (void)threads;
    return -1;
}

#endif
