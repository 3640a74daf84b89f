/* Float32 matrix product Y[M,N] = A[M,K] @ B[K,N] for AVX-512 (x86-64), B constant and packed once.
 *
 * Contract: ONNX MatMul of a float32 activation by a float32 [K, N] initializer, N % 16 == 0. Each output is
 * the float32 sum over k in order (fused multiply-adds, k ascending), whatever M, the row tile or the thread split:
 * a row's result does not depend on the rows batched with it.
 *
 * Why our own: ONNX Runtime's MLAS SGEMM reaches ~175-190 GFLOP/s at M = 16 rows on this 2-core machine (its
 * small-M kernels; docs/scale.md), which bounds batched decode of fp32 bundles, while a plain register-tiled
 * kernel over B packed once in 48-column panels reaches ~260 at M = 16 and ~490 at M = 512 (MLAS ~455), and
 * streams B at the memory's speed at M = 1.
 *
 * Packed layout: panels of 48 columns (the last one 16 or 32 if N % 48 != 0), each [K][width] contiguous, so a
 * tile's k-step loads 1-3 aligned vectors. A tile is up to 8 rows x one panel, accumulated in registers over a
 * K block of KC values (then stored, reloaded for the next block): B's block stays in L1 for the panel's rows.
 */
#ifndef EXAONE_SGEMM_CORE_H
#define EXAONE_SGEMM_CORE_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SG_NR 48
#define SG_KC 256
#define SG_PF 64 /* k rows of B prefetched ahead */
#define SG_TARGET __attribute__((target("avx512f,avx512dq,fma")))

static inline int64_t sg_panels(int64_t n) { return (n + SG_NR - 1) / SG_NR; }
static inline int64_t sg_width(int64_t n, int64_t p) { return n - p * SG_NR < SG_NR ? n - p * SG_NR : SG_NR; }

/* B [K, N] row-major -> panels; out has K * N floats, panel p at K * p * SG_NR. B is read row by row (a column
 * strip per panel would touch a page per row of B: packing an fp32 1.2B model took 12 s that way, ~1 s this way). */
static void sg_pack(const float *b, int64_t k, int64_t n, float *out) {
    for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t p = 0; p < sg_panels(n); ++p) {
            const int64_t w = sg_width(n, p);
            memcpy(out + (size_t)k * p * SG_NR + (size_t)kk * w, b + kk * n + p * SG_NR, (size_t)w * sizeof(float));
        }
}

SG_TARGET static inline __attribute__((always_inline)) void sg_tile(const float *a, int64_t lda, const float *bp,
                                                                   int64_t k0, int64_t k1, float *c, int64_t ldc,
                                                                   const int MR, const int NV, int accumulate,
                                                                   int prefetch) {
    __m512 r[8][3];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) r[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
    for (int64_t kk = k0; kk < k1; ++kk) {
        const float *b = bp + kk * 16 * NV;
        if (prefetch) /* the panel's rows ahead: memory streams while this tile computes (+22% at M = 16) */
            for (int j = 0; j < NV; ++j) _mm_prefetch((const char *)(b + SG_PF * 16 * NV + 16 * j), _MM_HINT_T0);
        __m512 bv[3];
        for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + 16 * j);
        for (int i = 0; i < MR; ++i) {
            const __m512 av = _mm512_set1_ps(a[i * lda + kk]);
            for (int j = 0; j < NV; ++j) r[i][j] = _mm512_fmadd_ps(av, bv[j], r[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, r[i][j]);
}

/* The first tile of a panel prefetches when more rows follow (one row is a plain stream the hardware follows). */
#define SG_ROWS(NVV)                                                                                                \
    do {                                                                                                            \
        const int pf = m_rows > 1;                                                                                  \
        int64_t m = 0;                                                                                              \
        for (; m + 8 <= m_rows; m += 8) sg_tile(a + m * k, k, bp, k0, k1, c + m * ldc, ldc, 8, NVV, acc, pf && !m); \
        for (; m + 4 <= m_rows; m += 4) sg_tile(a + m * k, k, bp, k0, k1, c + m * ldc, ldc, 4, NVV, acc, pf && !m); \
        for (; m < m_rows; ++m) sg_tile(a + m * k, k, bp, k0, k1, c + m * ldc, ldc, 1, NVV, acc, pf && !m);         \
    } while (0)

/* Panel p of the packed B, for rows [0, m_rows) of A [M, K]; writes Y's columns of that panel (Y row stride ldc). */
SG_TARGET static void sg_panel(const float *a, int64_t m_rows, int64_t k, int64_t n, const float *packed, int64_t p,
                               float *y, int64_t ldc) {
    const int64_t w = sg_width(n, p);
    const float *bp = packed + (size_t)k * p * SG_NR;
    float *c = y + p * SG_NR;
    for (int64_t k0 = 0; k0 < k; k0 += SG_KC) {
        const int64_t k1 = k0 + SG_KC < k ? k0 + SG_KC : k;
        const int acc = k0 > 0;
        if (w == 48)
            SG_ROWS(3);
        else if (w == 32)
            SG_ROWS(2);
        else
            SG_ROWS(1);
    }
}

#endif
