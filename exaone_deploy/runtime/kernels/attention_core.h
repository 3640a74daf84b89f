/* One decode step of grouped-query attention over a KV cache, for AVX-512 (x86-64).
 *
 * Contract: exactly what ONNX Runtime's com.microsoft GroupQueryAttention computes for one new token per row with
 * the past and present caches in one buffer (past_present_share_buffer), float32, up to float summation order.
 * One call is one (row, KV head) pair:
 *   - rotary embedding of the new key and of the group's G query heads at position `pos` (cos/sin cache rows `pos`,
 *     rotary_dim = 2 x the caches' width, half-split or interleaved pairs, the rest of each head copied);
 *   - the new key and value written at `pos` of the cache (the row's cache holds `cap` positions);
 *   - for each query head: softmax(scale x q . K[t]) over t in [0, pos], then the weighted sum of V[t].
 * No local window: which keys a `local_window_size` keeps changed between onnxruntime releases (the last W + 1,
 * then the last W), so sliding layers stay on onnxruntime's op.
 * INT8 caches (`att_decode` given scales; the op's k_quant_type = v_quant_type = PER_CHANNEL, kv_cache_bit_width
 * 8): the new key (after its rotary) and value are stored as saturate(nearbyint(x * (1 / scale[c]))) in
 * [-128, 127], per channel c of the KV head, as onnxruntime's op stores them (its rounding and reciprocal, checked
 * bit for bit in tests/test_attention_kernel.py); a cached x reads as code * scale[c]. The key scales are folded
 * into the query (q[c] * ks[c] . code[c]) and the value scales applied once to the weighted sum of codes, so a
 * cached row is converted, never multiplied, per key: the step reads a quarter of the float cache's bytes.
 * The softmax runs over blocks of ATT_BLOCK keys with a running maximum and sum (rescaling the partial sums when
 * the maximum grows), so no [heads x keys] score buffer is allocated whatever the context; with one block (up to
 * ATT_BLOCK keys) it is the textbook max-subtracted softmax.
 *
 * Why our own: ONNX Runtime's CPU GroupQueryAttention runs two small GEMM calls per (row, query head) and a
 * [B, heads, 1, cache] probability buffer; at batch 16 of the 1.2B shape that is ~20 ms of a ~78 ms int4 decode step
 * on this 2-core machine (docs/scale.md), for ~0.5 GFLOP of work. Here a key row is loaded once for the G query
 * heads that share it, and the work item is a (row, KV head), so K and V leave memory once per step.
 */
#ifndef EXAONE_ATTENTION_CORE_H
#define EXAONE_ATTENTION_CORE_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ATT_BLOCK 128
#define ATT_MAX_GROUP 16 /* query heads per KV head */
#define ATT_MAX_HEAD 256 /* head_size, a multiple of 16 */
#define ATT_TARGET __attribute__((target("avx512f,avx512dq,fma")))

typedef struct {
    int64_t heads, kv_heads, head, cap; /* query heads, KV heads, head size, cache positions per row */
    int64_t rot_half;                   /* rotary_dim / 2 (0: no rotary) */
    int interleaved;
    float scale;
} AttnShape;

/* x (head floats) rotated at one position: cos/sin hold rot_half values. */
static void att_rotate(const float *x, float *out, const float *cos, const float *sin, const AttnShape *s) {
    const int64_t h = s->rot_half;
    if (s->interleaved)
        for (int64_t i = 0; i < h; ++i) {
            const float a = x[2 * i], b = x[2 * i + 1];
            out[2 * i] = a * cos[i] - b * sin[i];
            out[2 * i + 1] = b * cos[i] + a * sin[i];
        }
    else
        for (int64_t i = 0; i < h; ++i) {
            const float a = x[i], b = x[i + h];
            out[i] = a * cos[i] - b * sin[i];
            out[i + h] = b * cos[i] + a * sin[i];
        }
    memcpy(out + 2 * h, x + 2 * h, (size_t)(s->head - 2 * h) * sizeof(float));
}

/* exp(x) for x <= 0 (the max-subtracted scores), 16 lanes: Cephes' expf polynomial on x - n ln2, scaled by 2^n
 * with vscalefps; within 2 ulp of expf (below -87, 0 or a denormal, as expf). */
ATT_TARGET static inline __m512 att_exp(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.5f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

/* Lane j = the sum of v[j]'s 16 lanes: a transpose-and-add tree (45 instructions for 16 dot products, where 16
 * separate horizontal sums take ~130). */
ATT_TARGET static inline __m512 att_hsum16(const __m512 *v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; ++i) /* lane quad: [v2i, v2i+1, v2i, v2i+1] partial sums */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) /* lane quad: [v4i, v4i+1, v4i+2, v4i+3] partial sums, per 128-bit lane */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* x [d] -> int8 codes at dst: saturate(nearbyint(x * (1 / scale))) (onnxruntime's per-channel cache quantization) */
ATT_TARGET static inline void att_quantize8(const float *x, const float *scale, int8_t *dst, int64_t d) {
    for (int64_t c = 0; c < d; c += 16) {
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_loadu_ps(scale + c));
        __m512 y = _mm512_mul_ps(_mm512_loadu_ps(x + c), inv);
        y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-128.f)), _mm512_set1_ps(127.f)); /* saturate (NaN: -128) */
        _mm_storeu_si128((__m128i *)(dst + c), _mm512_cvtsepi32_epi8(_mm512_cvt_roundps_epi32(
                                                   y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
}

/* 16 int8 codes -> 16 floats */
ATT_TARGET static inline __m512 att_load8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* The body of att_decode for float caches (q8 = 0) and int8 caches (q8 = 1; ks/vs: the layer's per-channel
 * scales [kv_heads * d]) for g_n query heads per KV head of d floats; inlined with constants for the
 * shipped shapes (below), so the loops over heads and head vectors unroll and the accumulators stay in registers.
 * kc/vc/next_k/next_v point at float or int8 rows as q8 says. */
ATT_TARGET static inline __attribute__((always_inline)) void
att_decode_body(const float *q, const float *k, const float *v, void *kc, void *vc, float *out, const float *cos,
                const float *sin, int64_t pos, int64_t kvh, const AttnShape *s, const float *ks, const float *vs,
                const void *next_k, const void *next_v, int64_t next_n, const int64_t g_n, const int64_t d,
                const int q8) {
    const int64_t nv = d / 16, es = q8 ? 1 : (int64_t)sizeof(float), row = d * es; /* bytes of a cached row */
    uint8_t *kdst = (uint8_t *)kc + ((size_t)kvh * s->cap + pos) * row,
            *vdst = (uint8_t *)vc + ((size_t)kvh * s->cap + pos) * row;
    if (q8) {
        float kr[ATT_MAX_HEAD] __attribute__((aligned(64)));
        ks += kvh * d, vs += kvh * d;
        if (s->rot_half)
            att_rotate(k + kvh * d, kr, cos, sin, s);
        else
            memcpy(kr, k + kvh * d, (size_t)d * sizeof(float));
        att_quantize8(kr, ks, (int8_t *)kdst, d);
        att_quantize8(v + kvh * d, vs, (int8_t *)vdst, d);
    } else {
        if (s->rot_half)
            att_rotate(k + kvh * d, (float *)kdst, cos, sin, s);
        else
            memcpy(kdst, k + kvh * d, (size_t)d * sizeof(float));
        memcpy(vdst, v + kvh * d, (size_t)d * sizeof(float));
    }

    float qr[ATT_MAX_GROUP * ATT_MAX_HEAD] __attribute__((aligned(64)));
    for (int64_t g = 0; g < g_n; ++g) {
        const float *qh = q + (kvh * g_n + g) * d;
        if (s->rot_half)
            att_rotate(qh, qr + g * d, cos, sin, s);
        else
            memcpy(qr + g * d, qh, (size_t)d * sizeof(float));
        if (q8) /* the key scales, folded into the query once */
            for (int64_t c = 0; c < d; c += 16)
                _mm512_store_ps(qr + g * d + c, _mm512_mul_ps(_mm512_load_ps(qr + g * d + c), _mm512_loadu_ps(ks + c)));
    }
    const uint8_t *kbase = (const uint8_t *)kc + (size_t)kvh * s->cap * row,
                  *vbase = (const uint8_t *)vc + (size_t)kvh * s->cap * row;
    const uint8_t *nk = next_k, *nvp = next_v;
    float kf[q8 ? 16 * d : 16] __attribute__((aligned(64))); /* int8 caches: 16 keys as floats */

    __m512 acc[ATT_MAX_GROUP * ATT_MAX_HEAD / 16];
    float m[ATT_MAX_GROUP], l[ATT_MAX_GROUP];
    float sc[ATT_MAX_GROUP][ATT_BLOCK] __attribute__((aligned(64)));
    for (int64_t i = 0; i < g_n * nv; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < g_n; ++g) m[g] = -INFINITY, l[g] = 0.f;
    const __m512 scale = _mm512_set1_ps(s->scale);

    for (int64_t t0 = 0; t0 <= pos; t0 += ATT_BLOCK) {
        const int64_t n = pos + 1 - t0 < ATT_BLOCK ? pos + 1 - t0 : ATT_BLOCK;
        /* scores, 16 keys at a time: each key's products in a vector, then one transpose-add tree */
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const int64_t jn = n - j0 < 16 ? n - j0 : 16;
            const uint8_t *krow = kbase + (t0 + j0) * row;
            /* the cache streams from memory: these keys come from L2 (the previous item asked for them), the next
             * item's keys are asked for now and its values during the weighted sum below, so both streams run
             * through the whole item (asking for both here measured 4-7% slower at batch 16) */
            for (int64_t j = 0; j < jn; ++j) {
                const int64_t t = t0 + j0 + j;
                for (int64_t o = 0; o < row; o += 64) {
                    _mm_prefetch((const char *)(krow + (j + 16) * row + o), _MM_HINT_T0);
                    if (t < next_n) _mm_prefetch((const char *)(nk + t * row + o), _MM_HINT_T1);
                }
                if (t == pos) /* the next item is longer: the rest of its keys now */
                    for (int64_t r = pos + 1; r < next_n; ++r)
                        for (int64_t o = 0; o < row; o += 64)
                            _mm_prefetch((const char *)(nk + r * row + o), _MM_HINT_T1);
            }
            const float *kt = (const float *)krow;
            if (q8) { /* the chunk's codes as floats, once for the group's heads */
                for (int64_t j = 0; j < jn; ++j)
                    for (int64_t c = 0; c < d; c += 16)
                        _mm512_store_ps(kf + j * d + c, att_load8((const int8_t *)krow + j * d + c));
                kt = kf;
            }
            for (int64_t g = 0; g < g_n; ++g) {
                __m512 part[16];
                for (int64_t j = 0; j < jn; ++j) {
                    __m512 a = _mm512_mul_ps(_mm512_load_ps(qr + g * d), _mm512_loadu_ps(kt + j * d));
                    for (int64_t c = 1; c < nv; ++c)
                        a = _mm512_fmadd_ps(_mm512_load_ps(qr + g * d + 16 * c), _mm512_loadu_ps(kt + j * d + 16 * c),
                                            a);
                    part[j] = a;
                }
                for (int64_t j = jn; j < 16; ++j) part[j] = _mm512_setzero_ps();
                _mm512_store_ps(&sc[g][j0], _mm512_mul_ps(att_hsum16(part), scale));
            }
        }
        /* running softmax over this block's scores; lanes past n are masked out */
        for (int64_t g = 0; g < g_n; ++g) {
            __m512 mx = _mm512_set1_ps(m[g]);
            for (int64_t j0 = 0; j0 < n; j0 += 16) {
                const __mmask16 live = n - j0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j0)) - 1);
                mx = _mm512_mask_max_ps(mx, live, mx, _mm512_load_ps(&sc[g][j0]));
            }
            const float mnew = _mm512_reduce_max_ps(mx), alpha = expf(m[g] - mnew); /* 0 on the first block */
            const __m512 mv = _mm512_set1_ps(mnew);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j0 = 0; j0 < n; j0 += 16) {
                const __mmask16 live = n - j0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j0)) - 1);
                const __m512 p = _mm512_maskz_mov_ps(live, att_exp(_mm512_sub_ps(_mm512_load_ps(&sc[g][j0]), mv)));
                _mm512_store_ps(&sc[g][j0], p);
                sum = _mm512_add_ps(sum, p);
            }
            l[g] = l[g] * alpha + _mm512_reduce_add_ps(sum);
            m[g] = mnew;
            if (alpha != 1.f)
                for (int64_t c = 0; c < nv; ++c)
                    acc[g * nv + c] = _mm512_mul_ps(acc[g * nv + c], _mm512_set1_ps(alpha));
        }
        for (int64_t j = 0; j < n; ++j) {
            const uint8_t *vt = vbase + (t0 + j) * row;
            /* the next item's values, a row per row read here (its keys were asked for during the scores) */
            if (t0 + j < next_n)
                for (int64_t o = 0; o < row; o += 64)
                    _mm_prefetch((const char *)(nvp + (t0 + j) * row + o), _MM_HINT_T1);
            if (t0 + j == pos) /* the next item is longer: the rest of its values now */
                for (int64_t r = pos + 1; r < next_n; ++r)
                    for (int64_t o = 0; o < row; o += 64) _mm_prefetch((const char *)(nvp + r * row + o), _MM_HINT_T1);
            for (int64_t c = 0; c < nv; ++c) {
                const __m512 vv =
                    q8 ? att_load8((const int8_t *)vt + 16 * c) : _mm512_loadu_ps((const float *)vt + 16 * c);
                for (int64_t g = 0; g < g_n; ++g)
                    acc[g * nv + c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g][j]), vv, acc[g * nv + c]);
            }
        }
    }
    for (int64_t g = 0; g < g_n; ++g) {
        const __m512 inv = _mm512_set1_ps(1.f / l[g]);
        float *o = out + (kvh * g_n + g) * d;
        for (int64_t c = 0; c < nv; ++c) /* int8: the value scales, once on the sum of codes */
            _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(q8 ? _mm512_mul_ps(acc[g * nv + c], _mm512_loadu_ps(vs + 16 * c))
                                                          : acc[g * nv + c],
                                                       inv));
    }
}

/* Row b's KV head kvh. q: the row's query [heads * head]; k, v: the row's new key/value [kv_heads * head];
 * kc, vc: the row's caches [kv_heads][cap][head], float, or int8 when ks / vs (the layer's per-channel scales
 * [kv_heads * head], the op's k_scale / v_scale) are given (NULL: float caches); out: the row's output
 * [heads * head]; cos/sin: the caches' rows at pos (NULL when rot_half == 0); next_k/next_v/next_n: the next item's
 * cache rows (of the same type) and length, to prefetch.
 * Specialized for EXAONE 4's two head layouts (1.2B: 4 query heads of 64 per KV head; 32B: 5 of 128): with the
 * group and head size as constants the step at batch 16 of the 1.2B shape takes ~12% less time than the generic
 * loop (benchmarks in docs/scale.md), whose acc[] and part[] arrays stay in memory. */
ATT_TARGET static void att_decode(const float *q, const float *k, const float *v, void *kc, void *vc, float *out,
                                  const float *cos, const float *sin, int64_t pos, int64_t kvh, const AttnShape *s,
                                  const float *ks, const float *vs, const void *next_k, const void *next_v,
                                  int64_t next_n) {
    const int64_t g_n = s->heads / s->kv_heads, d = s->head;
#define ATT_BODY(G, D, Q8) \
    att_decode_body(q, k, v, kc, vc, out, cos, sin, pos, kvh, s, ks, vs, next_k, next_v, next_n, G, D, Q8)
#define ATT_LAYOUTS(Q8)                          \
    do {                                         \
        if (g_n == 4 && d == 64)                 \
            ATT_BODY(4, 64, Q8);                 \
        else if (g_n == 5 && d == 128)           \
            ATT_BODY(5, 128, Q8);                \
        else                                     \
            ATT_BODY(g_n, d, Q8);                \
    } while (0)
    if (ks)
        ATT_LAYOUTS(1);
    else
        ATT_LAYOUTS(0);
#undef ATT_LAYOUTS
#undef ATT_BODY
}

#endif
