/* Block-quantized matrix product Y[M,N] = A[M,K] @ dequant(B)[K,N] for AVX-512 VNNI (x86-64).
 *
 * Contract (the numerics of ONNX Runtime's com.microsoft.MatMulNBits with accuracy_level 4, block BLK = 32, 64
 * or 128, symmetric weights, no zero-point input, no bias):
 *   B codes are unsigned, bits 4 or 8, with the implicit zero point 8 or 128; w[k,n] = (q[n,k] - zp) * s[n, k/BLK].
 *   A is quantized per row and per BLK-element block to int8: sa = max|a| / 127, qa = round(a / sa).
 *   Y[m,n] = sum over blocks b, in order, of  float(sum_k qa*q - zp*sum_k qa) * (s[n,b] * sa[m,b]).
 * Every output is the same sequence of operations whatever M, the row tile or the thread split: a row's result
 * does not depend on the rows batched with it (MLAS's M=1 and M>1 kernels round differently; this one does not).
 *
 * Why our own kernel: MLAS's M>1 CompInt8 path re-unpacks the 4-bit weights for every 2-row tile and converts
 * every block of every (row, column) pair (docs/perf.md), so int4 prompts ran slower than llama.cpp's Q4_0. Here
 * weights are repacked once at load into 16-column panels laid out for vpdpbusd (one 64-byte load = 16 columns x
 * 4 k-values); a row tile of up to 4 rows x 2 panels unpacks each weight block once and feeds it to every row.
 *
 * Packed layout, per panel of 16 columns, per block: BLK/32 sub-blocks of 32 k, each 4-bit: 256 data bytes (byte
 * 4c+t of 64-byte group j: low nibble = q[n0+c, k0+4j+t], high nibble = q[n0+c, k0+16+4j+t]) or 8-bit: 512 data
 * bytes (group j holds k = k0+4j..+3); then the block's 16 float scales. One sequential stream per panel.
 */
#ifndef EXAONE_QMATMUL_CORE_H
#define EXAONE_QMATMUL_CORE_H

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define QMM_SUB 32 /* k per sub-block: 8 vpdpbusd groups of 4 */
#define QMM_PANEL 16

#define QMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma")))

static inline size_t qmm_sub_bytes(int bits) { return bits == 4 ? 256 : 512; }

static inline size_t qmm_block_bytes(int bits, int blk) {
    return (size_t)(blk / QMM_SUB) * qmm_sub_bytes(bits) + QMM_PANEL * sizeof(float);
}

static inline size_t qmm_packed_bytes(int64_t n, int64_t k, int bits, int blk) {
    return (size_t)(n / QMM_PANEL) * (size_t)(k / blk) * qmm_block_bytes(bits, blk);
}

/* MatMulNBits B [N, KP/BLK, BLK*bits/8] (element 2i in the low nibble of byte i for 4 bits) and scales
 * [N, KP/BLK] -> the panel layout above. N % 16 == 0; k here is KP, K rounded up to the block. */
static void qmm_pack(const uint8_t *b, const float *scales, int64_t n, int64_t k, int bits, int blkl, uint8_t *out) {
    const int64_t nb = k / blkl, blob = (int64_t)blkl * bits / 8;
    const size_t bb = qmm_block_bytes(bits, blkl), data = bb - QMM_PANEL * sizeof(float);
    for (int64_t p = 0; p < n / QMM_PANEL; ++p) {
        for (int64_t blk = 0; blk < nb; ++blk) {
            uint8_t *dst = out + ((size_t)p * nb + blk) * bb;
            float *sdst = (float *)(dst + data);
            for (int c = 0; c < QMM_PANEL; ++c) {
                const int64_t col = p * QMM_PANEL + c;
                const uint8_t *src = b + ((size_t)col * nb + blk) * blob;
                sdst[c] = scales[col * nb + blk];
                for (int s0 = 0; s0 < blkl; s0 += QMM_SUB) { /* one 32-value sub-block */
                    uint8_t *sub = dst + (s0 / QMM_SUB) * qmm_sub_bytes(bits);
                    if (bits == 8) {
                        for (int kk = 0; kk < QMM_SUB; ++kk) sub[(kk / 4) * 64 + 4 * c + (kk & 3)] = src[s0 + kk];
                    } else { /* byte 4c+t of group j: value 4j+t in the low nibble, 16+4j+t in the high one */
                        const uint8_t *q2 = src + s0 / 2; /* value i: byte i/2, low nibble when i is even */
                        for (int kk = 0; kk < 16; ++kk) {
                            const uint8_t lo = (uint8_t)((q2[kk / 2] >> (4 * (kk & 1))) & 15);
                            const uint8_t hi = (uint8_t)((q2[(16 + kk) / 2] >> (4 * (kk & 1))) & 15);
                            sub[(kk / 4) * 64 + 4 * c + (kk & 3)] = (uint8_t)(lo | hi << 4);
                        }
                    }
                }
            }
        }
    }
}

/* Rows [m0, m1) of A [M, K] -> int8 codes [M, KP] (KP = K rounded up to the block; zeros past K, as MatMulNBits
 * pads a partial last block), scales [M, KP/BLK] and the zero-point correction -zp * sum(qa). */
QMM_TARGET static void qmm_quantize_rows(const float *a, int64_t m0, int64_t m1, int64_t k, int64_t kp, int bits,
                                         int blkl, int8_t *qa, float *sa, int32_t *corr) {
    const int64_t nb = kp / blkl;
    const int32_t zp = bits == 4 ? 8 : 128;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t m = m0; m < m1; ++m) {
        for (int64_t blk = 0; blk < nb; ++blk) {
            const float *src = a + m * k + blk * blkl;
            const int64_t left = k - blk * blkl; /* elements of this block inside K */
#define QMM_MASK(i) (left - (i) >= 16 ? (__mmask16)0xFFFF : left - (i) <= 0 ? (__mmask16)0 : (__mmask16)((1u << (left - (i))) - 1))
            __m512 mx = _mm512_setzero_ps();
            for (int i = 0; i < blkl; i += 16)
                mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_maskz_loadu_ps(QMM_MASK(i), src + i), absmask));
            const float amax = _mm512_reduce_max_ps(mx);
            const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int8_t *dst = qa + m * kp + blk * blkl;
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < blkl; i += 16) {
                const __m512 x = _mm512_maskz_loadu_ps(QMM_MASK(i), src + i);
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(inv)));
                _mm_storeu_si128((__m128i *)(dst + i), _mm512_cvtsepi32_epi8(q));
                sum = _mm512_add_epi32(sum, q);
            }
            sa[m * nb + blk] = scale;
            corr[m * nb + blk] = -zp * _mm512_reduce_add_epi32(sum);
        }
    }
}

/* One tile: MR rows (1..4) x NP panels (1..2) over all K (here: KP, the padded length). Inlined with constant MR/NP/bits so accumulators stay in
 * registers. Y rows are written (not accumulated).
 * Prefetch: the first row tile of a panel pair streams it from memory and asks QMM_PREFETCH bytes ahead of itself
 * (pf_every == 0). With more row tiles (batched decode: 16 rows = 4 tiles) the later tiles find the pair in L2
 * and instead bring in the next pair (next, next_np panels): at each block, tile t of T asks for the (t-1)-th of
 * T - 1 slices of the next pair's same block (pf_phase = t - 1, pf_every = T - 1), so the next pair's weights
 * arrive spread evenly over the compute of this one and its first tile does not wait on memory (-10 to -19% at
 * 8-32 rows; whole blocks every (T-1)-th block instead: the 8-bit head 9-13% slower; docs/scale.md). */
QMM_TARGET static inline __attribute__((always_inline)) void
qmm_tile(const uint8_t *panel0, size_t panel_stride, const int8_t *qa, const float *sa, const int32_t *corr, int64_t k,
         int blkl, float *y, int64_t ldy, const int bits, const int MR, const int NP, const uint8_t *next,
         int64_t next_np, int64_t pf_phase, int64_t pf_every) {
    const int64_t nb = k / blkl;
    const int subs = blkl / QMM_SUB;
    const size_t bb = qmm_block_bytes(bits, blkl), data = bb - QMM_PANEL * sizeof(float), sb = qmm_sub_bytes(bits);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[4][2];
    for (int r = 0; r < MR; ++r)
        for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < nb; ++blk) {
        __m512i dot[4][2];
        for (int r = 0; r < MR; ++r) {
            const __m512i c = _mm512_set1_epi32(corr[r * nb + blk]);
            for (int p = 0; p < NP; ++p) dot[r][p] = c;
        }
#ifndef QMM_PREFETCH
#define QMM_PREFETCH 1024
#endif
        /* weights ahead of this block: a 4-row tile computes 4x longer per block, so it can ask twice as far */
        const size_t ahead = MR >= 4 ? 2 * QMM_PREFETCH : QMM_PREFETCH;
        if (next && pf_every > 0 && pf_phase >= 0 && pf_phase < pf_every) { /* this tile's slice: lines [l0, l1) */
            const int64_t lines = (int64_t)(bb + 63) / 64, l0 = lines * pf_phase / pf_every,
                          l1 = lines * (pf_phase + 1) / pf_every;
            for (int p = 0; p < next_np; ++p)
                for (int64_t o = l0 * 64; o < l1 * 64; o += 64)
                    _mm_prefetch((const char *)(next + p * panel_stride + blk * bb + o), _MM_HINT_T1);
        }
        if (QMM_PREFETCH > 0 && !pf_every) /* the first tile, or the only one */
            for (int p = 0; p < NP; ++p)
                for (size_t o = 0; o < bb; o += 64)
                    _mm_prefetch((const char *)(panel0 + p * panel_stride + blk * bb + ahead + o), _MM_HINT_T0);
        for (int sub = 0; sub < subs; ++sub) {
            const int8_t *ablk = qa + blk * blkl + sub * QMM_SUB;
            const size_t off = blk * bb + sub * sb;
            if (bits == 4) {
                __m512i z[2][4];
                for (int p = 0; p < NP; ++p)
                    for (int j = 0; j < 4; ++j)
                        z[p][j] = _mm512_loadu_si512((const void *)(panel0 + p * panel_stride + off + 64 * j));
                for (int g = 0; g < 8; ++g) {
                    __m512i w[2];
                    for (int p = 0; p < NP; ++p)
                        w[p] = g < 4 ? _mm512_and_si512(z[p][g], low4)
                                     : _mm512_and_si512(_mm512_srli_epi16(z[p][g - 4], 4), low4);
                    for (int r = 0; r < MR; ++r) {
                        int32_t a4;
                        memcpy(&a4, ablk + r * k + 4 * g, 4);
                        const __m512i av = _mm512_set1_epi32(a4);
                        for (int p = 0; p < NP; ++p) dot[r][p] = _mm512_dpbusd_epi32(dot[r][p], w[p], av);
                    }
                }
            } else {
                for (int g = 0; g < 8; ++g) {
                    __m512i w[2];
                    for (int p = 0; p < NP; ++p)
                        w[p] = _mm512_loadu_si512((const void *)(panel0 + p * panel_stride + off + 64 * g));
                    for (int r = 0; r < MR; ++r) {
                        int32_t a4;
                        memcpy(&a4, ablk + r * k + 4 * g, 4);
                        const __m512i av = _mm512_set1_epi32(a4);
                        for (int p = 0; p < NP; ++p) dot[r][p] = _mm512_dpbusd_epi32(dot[r][p], w[p], av);
                    }
                }
            }
        }
        for (int p = 0; p < NP; ++p) {
            const __m512 s = _mm512_loadu_ps((const float *)(panel0 + p * panel_stride + blk * bb + data));
            for (int r = 0; r < MR; ++r) {
                const __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(sa[r * nb + blk]));
                acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][p]), scale, acc[r][p]);
            }
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int p = 0; p < NP; ++p) _mm512_storeu_ps(y + r * ldy + p * QMM_PANEL, acc[r][p]);
}

#define QMM_TILE(BITS, MRV, NPV)                                                                                    \
    qmm_tile(panel0, panel_stride, qa + m * k, sa + m * nb, corr + m * nb, k, blkl, y + m * n + col, n, BITS, MRV, NPV, \
             m >= 4 ? next : NULL, next_np, m / 4 - 1, m >= 4 && tiles > 1 ? tiles - 1 : 0)
#define QMM_TILES(MRV)                                                                                              \
    do {                                                                                                            \
        if (bits == 4) {                                                                                            \
            if (np == 2) QMM_TILE(4, MRV, 2); else QMM_TILE(4, MRV, 1);                                             \
        } else {                                                                                                    \
            if (np == 2) QMM_TILE(8, MRV, 2); else QMM_TILE(8, MRV, 1);                                             \
        }                                                                                                           \
    } while (0)

/* Columns of panels [p0, p1) for rows [0, M): quantized A given (k = KP, its padded row length). */
QMM_TARGET static void qmm_panels(const uint8_t *packed, const int8_t *qa, const float *sa, const int32_t *corr,
                                  int64_t m_rows, int64_t n, int64_t k, int bits, int blkl, int64_t p0, int64_t p1,
                                  float *y) {
    const int64_t nb = k / blkl;
    const size_t panel_stride = (size_t)nb * qmm_block_bytes(bits, blkl);
    for (int64_t p = p0; p < p1; p += 2) {
        const int np = p + 1 < p1 ? 2 : 1;
        const uint8_t *panel0 = packed + (size_t)p * panel_stride;
        const int64_t col = p * QMM_PANEL;
        const uint8_t *next = p + 2 < p1 ? packed + (size_t)(p + 2) * panel_stride : NULL; /* this task's next pair */
        const int64_t next_np = p + 3 < p1 ? 2 : 1, tiles = m_rows / 4;
        int64_t m = 0;
        for (; m + 4 <= m_rows; m += 4) QMM_TILES(4);
        for (; m + 2 <= m_rows; m += 2) QMM_TILES(2);
        for (; m < m_rows; ++m) QMM_TILES(1);
    }
}

#endif
