/* Prefill attention on bf16: a chunk of T queries over N keys, causal and optionally windowed,
 * grouped-query heads sharing their KV head, in one pass (flash attention: a running max and
 * sum per query row, no (T, N) score matrix in memory).
 *
 *   q (Hq, T, D) bf16 (rows contiguous, head and row strides given), k, v (Hkv, N, D) bf16
 *   contiguous, query t at position q_start + t, key j at k_start + j; query i sees key j when
 *   k_pos <= q_pos and (window == 0 or q_pos - k_pos < window).  out (Hq, T, D) bf16.
 *
 * The reference beside it is torch's scaled_dot_product_attention with the mask of
 * kvtier.attention.blockwise.visible; tests/test_prefill_attention.py checks the two agree.
 *
 * Both products run on AVX512-BF16's dot-product instruction (two bf16 products summed into an
 * fp32 lane): the keys of each 64-key tile are transposed once into pairs of channels by token
 * (Kp[p][token] = (K[token][2p], K[token][2p+1])), the values into pairs of tokens by channel
 * (Vp[pair][c] = (V[2 pair][c], V[2 pair + 1][c])), so a query's channel pair or a row's pair of
 * softmax weights is broadcast against 16 lanes.  The softmax weights are rounded to bf16 before
 * the value product, as torch's bf16 flash attention does.  Where the CPU has AMX, both products
 * run on its tiles instead (attend_rows_amx; KVTIER_AMX=0 keeps the vector path).  Without
 * AVX512-BF16 the entry point returns -1 and the caller takes torch's path.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "amx.h"
#include "vexp.h"

#define TILE 64 /* keys per tile */
#define BR 4    /* query rows per micro-block: 16 accumulators of scores, 16 of output */
#define QB 32   /* query rows per task */

/* The keys [j0, j1) that any query at positions pmin..pmax sees. */
static void seen_keys(long pmin, long pmax, long k_start, long n, long window, long *j0, long *j1) {
    long hi = pmax - k_start + 1, lo = window ? pmin - window + 1 - k_start : 0;
    if (hi > n) hi = n;
    if (lo < 0) lo = 0;
    if (hi <= lo) hi = lo;
    *j0 = lo;
    *j1 = hi;
}

/* One KV head's keys and values, N tokens, into tiles of pairs (zero past N). */
static void repack(const uint16_t *k, const uint16_t *v, long n, int d, long tiles, uint32_t *kp, uint32_t *vp) {
    const int pairs = d / 2;
    const uint32_t *k32 = (const uint32_t *)k;
    for (long ti = 0; ti < tiles; ti++) {
        uint32_t *kt = kp + ti * (long)pairs * TILE, *vt = vp + ti * (long)(TILE / 2) * d;
        for (int j = 0; j < TILE; j++) {
            const long tok = ti * TILE + j;
            for (int p = 0; p < pairs; p++) kt[p * TILE + j] = tok < n ? k32[tok * pairs + p] : 0u;
        }
        for (int jp = 0; jp < TILE / 2; jp++) {
            const long t0 = ti * TILE + 2 * jp, t1 = t0 + 1;
            for (int c = 0; c < d; c++) {
                const uint32_t lo = t0 < n ? v[t0 * d + c] : 0u, hi = t1 < n ? v[t1 * d + c] : 0u;
                vt[jp * d + c] = lo | (hi << 16);
            }
        }
    }
}

/* Rows [r0, r0 + nr) of one KV head's (t, g) row order against key tiles; o (QB, D) fp32. */
static void attend_rows(const uint16_t *q, long qs_h, long qs_t, int h, int g, int d, long r0, int nr,
                        long q_start, long k_start, long n, long window, float scale,
                        const uint32_t *kp, const uint32_t *vp, uint16_t *out, long os_h, long os_t, float *o) {
    const int pairs = d / 2;
    float m[QB], l[QB];
    const uint32_t *qrow[QB];
    long qpos[QB];
    for (int r = 0; r < nr; r++) {
        const long row = r0 + r, t = row / g, gi = row % g;
        qrow[r] = (const uint32_t *)(q + (h * g + gi) * qs_h + t * qs_t);
        qpos[r] = q_start + t;
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * QB * d);
    long j0, j1;
    seen_keys(qpos[0], qpos[nr - 1], k_start, n, window, &j0, &j1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    uint32_t prow[BR][TILE / 2] __attribute__((aligned(64)));
    for (long ti = j0 / TILE; ti * TILE < j1; ti++) {
        const uint32_t *kt = kp + ti * (long)pairs * TILE, *vt = vp + ti * (long)(TILE / 2) * d;
        const long kpos0 = k_start + ti * TILE;
        for (int rb = 0; rb < nr; rb += BR) {
            const int nb = nr - rb < BR ? nr - rb : BR;
            const long bmin = qpos[rb], bmax = qpos[rb + nb - 1];
            if (kpos0 > bmax) continue; /* the tile is in this block's future */
            if (window && bmin - (kpos0 + TILE - 1) >= window) continue;
            __m512 s[BR][4];
            for (int r = 0; r < BR; r++)
                for (int c = 0; c < 4; c++) s[r][c] = _mm512_setzero_ps();
            for (int p = 0; p < pairs; p++) {
                const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + p * TILE),
                               k1 = (__m512bh)_mm512_loadu_si512(kt + p * TILE + 16),
                               k2 = (__m512bh)_mm512_loadu_si512(kt + p * TILE + 32),
                               k3 = (__m512bh)_mm512_loadu_si512(kt + p * TILE + 48);
                for (int r = 0; r < BR; r++) {
                    const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qrow[rb + (r < nb ? r : 0)][p]);
                    s[r][0] = _mm512_dpbf16_ps(s[r][0], qb, k0);
                    s[r][1] = _mm512_dpbf16_ps(s[r][1], qb, k1);
                    s[r][2] = _mm512_dpbf16_ps(s[r][2], qb, k2);
                    s[r][3] = _mm512_dpbf16_ps(s[r][3], qb, k3);
                }
            }
            const int edge = kpos0 + TILE - 1 > bmin || (ti + 1) * TILE > n ||
                             (window && bmax - kpos0 >= window);
            float alpha[BR];
            for (int r = 0; r < BR; r++) {
                alpha[r] = 1.0f;
                if (r >= nb) {
                    memset(prow[r], 0, sizeof prow[r]);
                    continue;
                }
                const int R = rb + r;
                __mmask16 vis[4] = {0xffff, 0xffff, 0xffff, 0xffff};
                if (edge) {
                    for (int c = 0; c < 4; c++) {
                        const __m512i kpos = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(kpos0 - k_start + 16 * c)));
                        /* token index j < n and j <= qpos - k_start (and qpos - k_start - j < window) */
                        const __m512i lim = _mm512_set1_epi32((int)((qpos[R] - k_start + 1) < n ? qpos[R] - k_start + 1 : n));
                        vis[c] = _mm512_cmplt_epi32_mask(kpos, lim);
                        if (window)
                            vis[c] &= _mm512_cmpgt_epi32_mask(kpos, _mm512_set1_epi32((int)(qpos[R] - k_start - window)));
                    }
                }
                const __m512 ninf = _mm512_set1_ps(-INFINITY), vs = _mm512_set1_ps(scale);
                __m512 mx = ninf;
                for (int c = 0; c < 4; c++) {
                    s[r][c] = _mm512_mask_mov_ps(ninf, vis[c], _mm512_mul_ps(s[r][c], vs));
                    mx = _mm512_max_ps(mx, s[r][c]);
                }
                const float top = _mm512_reduce_max_ps(mx);
                if (top == -INFINITY) {
                    memset(prow[r], 0, sizeof prow[r]);
                    continue;
                }
                const float mnew = top > m[R] ? top : m[R];
                alpha[r] = m[R] == -INFINITY ? 0.0f : expf(m[R] - mnew);
                m[R] = mnew;
                const __m512 vm = _mm512_set1_ps(mnew);
                __m512 sum = _mm512_setzero_ps();
                for (int c = 0; c < 4; c++) {
                    s[r][c] = _mm512_maskz_mov_ps(vis[c], exp512(_mm512_sub_ps(s[r][c], vm)));
                    sum = _mm512_add_ps(sum, s[r][c]);
                }
                l[R] = l[R] * alpha[r] + _mm512_reduce_add_ps(sum);
                _mm512_store_si512(prow[r], (__m512i)_mm512_cvtne2ps_pbh(s[r][1], s[r][0]));
                _mm512_store_si512(prow[r] + 16, (__m512i)_mm512_cvtne2ps_pbh(s[r][3], s[r][2]));
            }
            /* o[rows] = alpha o[rows] + P V_tile, 64 channels at a time */
            for (int c0 = 0; c0 < d; c0 += 64) {
                __m512 acc[BR][4];
                for (int r = 0; r < BR; r++) {
                    const __m512 va = _mm512_set1_ps(alpha[r]);
                    for (int c = 0; c < 4; c++)
                        acc[r][c] = r < nb ? _mm512_mul_ps(va, _mm512_loadu_ps(o + (rb + r) * d + c0 + 16 * c))
                                           : _mm512_setzero_ps();
                }
                for (int jp = 0; jp < TILE / 2; jp++) {
                    const uint32_t *vr = vt + jp * d + c0;
                    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vr), v1 = (__m512bh)_mm512_loadu_si512(vr + 16),
                                   v2 = (__m512bh)_mm512_loadu_si512(vr + 32), v3 = (__m512bh)_mm512_loadu_si512(vr + 48);
                    for (int r = 0; r < BR; r++) {
                        const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)prow[r][jp]);
                        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], pb, v0);
                        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], pb, v1);
                        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], pb, v2);
                        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], pb, v3);
                    }
                }
                for (int r = 0; r < nb; r++)
                    for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + (rb + r) * d + c0 + 16 * c, acc[r][c]);
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        const long row = r0 + r, t = row / g, gi = row % g;
        uint16_t *dst = out + (h * g + gi) * os_h + t * os_t;
        const __m512 inv = _mm512_set1_ps(l[r] > 0.0f ? 1.0f / l[r] : 0.0f);
        for (int c = 0; c < d; c += 32) {
            const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + c), inv),
                         b = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + c + 16), inv);
            _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}

#ifdef KVT_AMX
/* The same attention on AMX tiles, 16 query rows against each 64-key tile: the scores are four
 * 16 x 16 fp32 tiles (the query rows as A, the key pairs of ``repack`` as B, D / 32 steps), the
 * softmax runs on them in AVX-512 as above, and the weights, rounded to bf16 as above, multiply
 * the value pairs (A: 16 rows x 32 keys, B: 16 key pairs x 16 channels) into the fp32 output
 * rows, loaded as tiles and stored back.  The weights are powers of two of the scores in base-2
 * units (one multiply-subtract and exp2_512).  A row's output is rescaled only when its maximum
 * moves.  (Keeping a stale maximum within a margin would rescale less often, but the dominant
 * weight of a peaked row is then rounded to bf16 instead of being exactly 1: 1.6x the error of
 * torch's bf16 attention.)  Tasks go head by head, so the threads share one head's repacked keys
 * and values in the caches (at 8K tokens: 27.8 -> 17.1 ms against interleaved heads).
 * Tiles: 0-3 scores or output, 4 A, 5-6 B. */
#define AR 16

/* Tiles 0-3 += A times four B tiles side by side: A (tile 4) is 16 rows of 32 bf16 at a, stride
 * a_stride bytes; B j (tiles 5, 6 in turn) is 16 rows of 16 bf16 pairs at b + 16 j, stride
 * b_stride bytes. */
static inline void times_four_tiles(const void *a, int a_stride, const uint32_t *b, int b_stride) {
    _tile_loadd(4, a, a_stride);
    _tile_loadd(5, b, b_stride);
    _tile_loadd(6, b + 16, b_stride);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, b + 32, b_stride);
    _tile_loadd(6, b + 48, b_stride);
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(3, 4, 6);
}

static void attend_rows_amx(const uint16_t *q, long qs_h, long qs_t, int h, int g, int d, long r0, int nr,
                            long q_start, long k_start, long n, long window, float scale,
                            const uint32_t *kp, const uint32_t *vp, uint16_t *out, long os_h, long os_t,
                            float *o, uint16_t *qbuf) {
    const int pairs = d / 2;
    float m[AR], lv[AR][16] __attribute__((aligned(64)));
    float sbuf[AR][TILE] __attribute__((aligned(64)));
    uint16_t pbuf[AR][TILE] __attribute__((aligned(64)));
    long qpos[AR];
    memset(pbuf, 0, sizeof pbuf);
    memset(lv, 0, sizeof lv);
    memset(o, 0, sizeof(float) * AR * d);
    for (int r = 0; r < AR; r++) {
        m[r] = -INFINITY;
        if (r < nr) {
            const long row = r0 + r, t = row / g, gi = row % g;
            memcpy(qbuf + r * d, q + (h * g + gi) * qs_h + t * qs_t, sizeof(uint16_t) * d);
            qpos[r] = q_start + t;
        } else {
            memset(qbuf + r * d, 0, sizeof(uint16_t) * d);
            qpos[r] = qpos[nr - 1];
        }
    }
    const long bmin = qpos[0], bmax = qpos[nr - 1];
    long j0, j1;
    seen_keys(bmin, bmax, k_start, n, window, &j0, &j1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float scale2 = scale * 1.44269504088896341f; /* scores to base-2 exponents */
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vs2 = _mm512_set1_ps(scale2);
    for (long ti = j0 / TILE; ti * TILE < j1; ti++) {
        const uint32_t *kt = kp + ti * (long)pairs * TILE, *vt = vp + ti * (long)(TILE / 2) * d;
        const long kpos0 = k_start + ti * TILE;
        /* scores: S (16 x 64) = Q K^T */
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int ks = 0; ks < d / 32; ks++)
            times_four_tiles(qbuf + 32 * ks, 2 * d, kt + 16 * ks * TILE, 4 * TILE);
        _tile_stored(0, &sbuf[0][0], 4 * TILE);
        _tile_stored(1, &sbuf[0][16], 4 * TILE);
        _tile_stored(2, &sbuf[0][32], 4 * TILE);
        _tile_stored(3, &sbuf[0][48], 4 * TILE);
        const int edge = kpos0 + TILE - 1 > bmin || (ti + 1) * TILE > n || (window && bmax - kpos0 >= window);
        for (int r = 0; r < nr; r++) {
            __mmask16 vis[4] = {0xffff, 0xffff, 0xffff, 0xffff};
            if (edge) {
                const long lim = qpos[r] - k_start + 1 < n ? qpos[r] - k_start + 1 : n;
                for (int c = 0; c < 4; c++) {
                    const __m512i kpos = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(kpos0 - k_start + 16 * c)));
                    vis[c] = _mm512_cmplt_epi32_mask(kpos, _mm512_set1_epi32((int)lim));
                    if (window)
                        vis[c] &= _mm512_cmpgt_epi32_mask(kpos, _mm512_set1_epi32((int)(qpos[r] - k_start - window)));
                }
            }
            __m512 s[4], mx = ninf;
            for (int c = 0; c < 4; c++) {
                s[c] = edge ? _mm512_mask_mov_ps(ninf, vis[c], _mm512_load_ps(&sbuf[r][16 * c]))
                            : _mm512_load_ps(&sbuf[r][16 * c]);
                mx = _mm512_max_ps(mx, s[c]);
            }
            const float top = _mm512_reduce_max_ps(mx) * scale2; /* base-2 units */
            if (top == -INFINITY) {
                memset(pbuf[r], 0, sizeof pbuf[r]);
                continue;
            }
            if (top > m[r]) {
                if (m[r] != -INFINITY) { /* a new maximum: rescale this row's sums */
                    const __m512 a = _mm512_set1_ps(exp2f(m[r] - top));
                    _mm512_store_ps(lv[r], _mm512_mul_ps(_mm512_load_ps(lv[r]), a));
                    for (int c = 0; c < d; c += 16)
                        _mm512_store_ps(o + r * d + c, _mm512_mul_ps(_mm512_load_ps(o + r * d + c), a));
                }
                m[r] = top;
            }
            const __m512 vm = _mm512_set1_ps(m[r]);
            __m512 sum = _mm512_load_ps(lv[r]);
            for (int c = 0; c < 4; c++) {
                s[c] = exp2_512(_mm512_fmsub_ps(s[c], vs2, vm));
                if (edge) s[c] = _mm512_maskz_mov_ps(vis[c], s[c]);
                sum = _mm512_add_ps(sum, s[c]);
            }
            _mm512_store_ps(lv[r], sum);
            _mm512_store_si512(&pbuf[r][0], (__m512i)_mm512_cvtne2ps_pbh(s[1], s[0]));
            _mm512_store_si512(&pbuf[r][32], (__m512i)_mm512_cvtne2ps_pbh(s[3], s[2]));
        }
        /* O (16 x D) += P V, 64 channels at a time */
        for (int c0 = 0; c0 < d; c0 += 64) {
            _tile_loadd(0, o + c0, 4 * d);
            _tile_loadd(1, o + c0 + 16, 4 * d);
            _tile_loadd(2, o + c0 + 32, 4 * d);
            _tile_loadd(3, o + c0 + 48, 4 * d);
            for (int kk = 0; kk < 2; kk++)
                times_four_tiles(&pbuf[0][32 * kk], 2 * TILE, vt + 16 * kk * d + c0, 4 * d);
            _tile_stored(0, o + c0, 4 * d);
            _tile_stored(1, o + c0 + 16, 4 * d);
            _tile_stored(2, o + c0 + 32, 4 * d);
            _tile_stored(3, o + c0 + 48, 4 * d);
        }
    }
    for (int r = 0; r < nr; r++) {
        const long row = r0 + r, t = row / g, gi = row % g;
        uint16_t *dst = out + (h * g + gi) * os_h + t * os_t;
        const float l = _mm512_reduce_add_ps(_mm512_load_ps(lv[r]));
        const __m512 inv = _mm512_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
        for (int c = 0; c < d; c += 32) {
            const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + c), inv),
                         b = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + c + 16), inv);
            _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}
#endif

int kvtier_prefill_attend(const uint16_t *q, long qs_h, long qs_t, const uint16_t *k, const uint16_t *v,
                          int hq, int hkv, long t, long n, int d, long q_start, long k_start, long window,
                          float scale, uint16_t *out, int threads) {
    if (d % 64 || d > 512 || hkv <= 0 || hq % hkv || t <= 0 || n <= 0 || n > (1L << 30)) return -1;
    const int g = hq / hkv;
    /* per KV head, K and V each: tiles x 64 tokens x D bf16, as tiles x 32 x D uint32 pairs */
    const long tiles = (n + TILE - 1) / TILE, half = tiles * (TILE / 2) * d;
    uint32_t *kp = aligned_alloc(64, sizeof(uint32_t) * half * hkv);
    uint32_t *vp = aligned_alloc(64, sizeof(uint32_t) * half * hkv);
    if (!kp || !vp) {
        free(kp);
        free(vp);
        return -1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < hkv; h++) repack(k + h * n * d, v + h * n * d, n, d, tiles, kp + h * half, vp + h * half);
    const long rows = t * g;
#ifdef KVT_AMX
    const int amx = amx_permitted();
#else
    const int amx = 0;
#endif
    const int qb = amx ? 16 : QB;
    const long blocks = (rows + qb - 1) / qb, tasks = blocks * hkv;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *o = aligned_alloc(64, sizeof(float) * QB * d);
        uint16_t *qbuf = aligned_alloc(64, sizeof(uint16_t) * 16 * d);
        if (!o || !qbuf) {
#pragma omp atomic write
            failed = 1;
        }
#ifdef KVT_AMX
        TileConfig saved;
        if (amx && o && qbuf) amx_begin(&saved, 7, NULL);
#endif
        /* the last row blocks see the most keys: hand them out first */
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < tasks; task++) {
            if (!o || !qbuf) continue;
            /* head by head (its repacked keys and values stay in the caches the threads share) */
            const long b = blocks - 1 - task % blocks;
            const int h = (int)(task / blocks);
            const long r0 = b * qb;
            const int nr = rows - r0 < qb ? (int)(rows - r0) : qb;
#ifdef KVT_AMX
            if (amx) {
                attend_rows_amx(q, qs_h, qs_t, h, g, d, r0, nr, q_start, k_start, n, window, scale, kp + h * half,
                                vp + h * half, out, t * d, d, o, qbuf);
                continue;
            }
#endif
            attend_rows(q, qs_h, qs_t, h, g, d, r0, nr, q_start, k_start, n, window, scale, kp + h * half,
                        vp + h * half, out, t * d, d, o);
        }
#ifdef KVT_AMX
        if (amx && o && qbuf) amx_end(&saved);
#endif
        free(o);
        free(qbuf);
    }
    free(kp);
    free(vp);
    return failed ? -1 : 0;
}

#else

int kvtier_prefill_attend(const uint16_t *q, long qs_h, long qs_t, const uint16_t *k, const uint16_t *v,
                          int hq, int hkv, long t, long n, int d, long q_start, long k_start, long window,
                          float scale, uint16_t *out, int threads) {
    (void)q; (void)qs_h; (void)qs_t; (void)k; (void)v; (void)hq; (void)hkv; (void)t; (void)n; (void)d;
    (void)q_start; (void)k_start; (void)window; (void)scale; (void)out; (void)threads;
    return -1;
}

#endif
