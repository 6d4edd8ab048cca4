/* Encoding of the `int` codec (KIVI's asymmetric quantization, bits 2, 4 and 8): the same
 * numbers as the PyTorch encoder it stands beside (kvtier.kv.codecs.intq.quantize and
 * packing.pack), tested equal byte for byte. Blocks of B tokens (h, n, B, D), bf16 or fp32:
 *   keys    per channel over the block's tokens; codes packed in planes along the channels and
 *           stored channel-major, k[h, n, j, t] (byte row j holds channel i*m + j in plane i);
 *   values  per token over groups of `group` channels, packed the same way, token-major.
 * A (scale, zero) pair: lo, hi the slice's min and max; scale = fp16((hi - lo) / (2^b - 1)),
 * zero = fp16(lo); code = clamp(round_half_even((x - zero) / scale), 0, 2^b - 1), with scale 1
 * where it is 0. Compiled without -ffast-math's shortcuts: the division must stay a division
 * (gcc would multiply by a hoisted reciprocal) and rounding must be to nearest even. */
#pragma GCC optimize("no-fast-math")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline float element(const void *x, long i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* scale and zero of one slice (min lo, max hi), as fp16; the divisor used for its codes */
static inline float pair(float lo, float hi, int levels, _Float16 *scale, _Float16 *zero, float *zf) {
    *scale = (_Float16)((hi - lo) / (float)levels);
    *zero = (_Float16)lo;
    *zf = (float)*zero;
    return (float)*scale > 0.f ? (float)*scale : 1.f;
}

static inline uint8_t code(float x, float zf, float safe, int levels) {
    float c = nearbyintf((x - zf) / safe);
    c = c < 0.f ? 0.f : c;
    c = c > (float)levels ? (float)levels : c;
    return (uint8_t)c;
}

/* k, v (h, n, B, D) contiguous; outputs as the codec's fields (kvtier.kv.codecs.intq.Int.fields)
 * for n blocks of each head: kp (h, n, D*bits/8, B), ks, kz (h, n, D), vp (h, n, B, D*bits/8),
 * vs, vz (h, n, B, D/group). Returns 0, or -1 for sizes it does not take. */
int kvtier_int_encode(const void *k, const void *v, int bf16, int64_t h, int64_t n, int64_t B, int64_t D,
                      int bits, int group, uint8_t *kp, _Float16 *ks, _Float16 *kz,
                      uint8_t *vp, _Float16 *vs, _Float16 *vz, int threads) {
    if ((bits != 2 && bits != 4 && bits != 8) || B < 1 || D < 1 || group < 1 || D % group
        || D % (8 / bits) || D > 4096)
        return -1;
    const int levels = (1 << bits) - 1, planes = 8 / bits, m = (int)(D / planes), mb = (int)(D * bits / 8);
    const long blocks = h * n;
    #pragma omp parallel for schedule(static) num_threads(threads) if (blocks * B * D >= 65536)
    for (long blk = 0; blk < blocks; blk++) {
        const long base = blk * B * D;
        uint8_t codes[4096];
        /* keys: each channel over the block's tokens */
        float lo[4096], hi[4096], zf[4096], safe[4096];
        for (long c = 0; c < D; c++) { lo[c] = INFINITY; hi[c] = -INFINITY; }
        for (long t = 0; t < B; t++)
            for (long c = 0; c < D; c++) {
                const float x = element(k, base + t * D + c, bf16);
                lo[c] = x < lo[c] ? x : lo[c];
                hi[c] = x > hi[c] ? x : hi[c];
            }
        for (long c = 0; c < D; c++)
            safe[c] = pair(lo[c], hi[c], levels, &ks[blk * D + c], &kz[blk * D + c], &zf[c]);
        uint8_t *kb = kp + blk * mb * B;
        for (long t = 0; t < B; t++) {
            for (long c = 0; c < D; c++) codes[c] = code(element(k, base + t * D + c, bf16), zf[c], safe[c], levels);
            for (int j = 0; j < m; j++) {  /* byte row j, token t */
                unsigned byte = 0;
                for (int i = 0; i < planes; i++) byte |= (unsigned)codes[i * m + j] << (i * bits);
                kb[(long)j * B + t] = (uint8_t)byte;
            }
        }
        /* values: each token over groups of channels */
        const long ng = D / group;
        for (long t = 0; t < B; t++) {
            const long row = base + t * D;
            for (long g = 0; g < ng; g++) {
                float l = INFINITY, u = -INFINITY;
                for (long c = g * group; c < (g + 1) * group; c++) {
                    const float x = element(v, row + c, bf16);
                    l = x < l ? x : l;
                    u = x > u ? x : u;
                }
                float z;
                const long at = (blk * B + t) * ng + g;
                const float s = pair(l, u, levels, &vs[at], &vz[at], &z);
                for (long c = g * group; c < (g + 1) * group; c++) codes[c] = code(element(v, row + c, bf16), z, s, levels);
            }
            uint8_t *out = vp + (blk * B + t) * mb;
            for (int j = 0; j < m; j++) {
                unsigned byte = 0;
                for (int i = 0; i < planes; i++) byte |= (unsigned)codes[i * m + j] << (i * bits);
                out[j] = (uint8_t)byte;
            }
        }
    }
    return 0;
}
