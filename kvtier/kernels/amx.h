/* Intel AMX (the tile registers and their bf16 dot products) where the compiler targets it
 * (-march=native on a CPU that has it) and Linux lets the process use it. */
#ifndef KVT_AMX_H
#define KVT_AMX_H

#include <stdint.h>
#include <stdlib.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define KVT_AMX 1
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Whether the tiles may be used now: KVTIER_AMX=0 says no (to compare; read at every call), and
 * Linux must let the process use them (asked once: the tile data is state it saves on a context
 * switch only for processes that asked). */
static int amx_permitted(void) {
    static int ok = -1;
    const char *env = getenv("KVTIER_AMX");
    if (env != NULL && env[0] == '0') return 0;
    if (ok < 0) ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ok;
}

/* palette 1: per tile, its rows and the bytes of a row */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* In each thread that uses the tiles: tiles 0 .. n - 1 configured as rows[t] (16 where rows is
 * NULL) rows of 64 bytes (up to a 16 x 16 fp32 or 16 x 32 bf16 tile), the configuration found
 * there kept in ``saved``. */
static inline void amx_begin(TileConfig *saved, int n, const uint8_t *rows) {
    _tile_storeconfig(saved);
    TileConfig cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < n; t++) { cfg.rows[t] = rows ? rows[t] : 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* ... and after: the configuration found is put back (or the tiles released when there was
 * none), so a library in this process that configured them (oneDNN, torch's brgemm for its
 * bf16 matmuls and flash attention) and remembers having done so still finds its own. */
static inline void amx_end(const TileConfig *saved) {
    if (saved->palette) _tile_loadconfig(saved);
    else _tile_release();
}
#endif

#endif
