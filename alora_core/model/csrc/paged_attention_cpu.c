/* Batched attention of a step's short-query rows over the paged KV pool, in place (CPU, float32).
 *
 * Built at run time by alora_core/model/cpu_kernels.py (cc -O3 -march=native -fopenmp), loaded with
 * ctypes; it shares torch's OpenMP runtime (the same libgomp.so.1), so its threads are torch's.
 * Semantics (the torch reference is paged_attention_cpu.reference):
 *
 *   for item in items:                          a run of keys and the rows that attend to it
 *     for kv head h, for row r in item.rows, for query head g of h:
 *       s_j = scale * q[r, g] . k[h, item.slot + j]        j < item.keys, key position item.pos + j
 *       s_j = softcap * tanh(s_j / softcap)                 (softcap > 0)
 *       visible iff item.pos + j <= pos[r] and (window == 0 or pos[r] - item.pos - j < window)
 *       partial[item.part + r - item.row_lo, g] = (sum_j e^(s_j - m) v[h, slot + j], m, sum_j e^(s_j - m))
 *   for row r: out[q_row[r], g] = softmax-merge of its partials (part_ptr/part_idx), times
 *              sigmoid(lse - sinks[g]) where sinks are given
 *
 * Needs dim % 16 == 0 (every head size served in practice; the caller checks). q, out and the partials
 * are float32; the pool is float32 or bfloat16 (kv_bf16: each task widens the keys and values it reads
 * into its scratch once, so the pool is read at half the bytes and the arithmetic is the float32 one).
 * Every item is one task per kv head (OpenMP, dynamic schedule); its rows' query vectors stay in a
 * per-task buffer, each key block is read once for all of them (a fork group's shared prefix is read
 * once per step for every fork). Keys are visited in blocks with an online softmax: 16 (one vector of
 * scores) for few query vectors, KEY_BLOCK for 6 or more (the lanes path). Measured on the CI VM (AMD
 * EPYC, AVX-512, 2 threads), 512 queries over 8192 keys, 8 heads / 4 kv heads of 64: 130 -> 147 GFLOP/s
 * from KEY_BLOCK 64 instead of 16, accumulators with the queries along the lanes, no masking of blocks
 * every row sees wholly, and the AVX-512 exp (vexp_softmax).
 */
#define _GNU_SOURCE
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


typedef struct {
    const float *q;        /* [T, H, D] strides (q_stride_t, q_stride_h, 1) */
    int64_t q_stride_t, q_stride_h;
    const float *k, *v;    /* [KVH, S, D] strides (kv_stride_h, D, 1) */
    int64_t kv_stride_h;
    float *out;            /* [T, H, D] contiguous */
    int64_t heads, kv_heads, dim;
    float scale, softcap;  /* softcap 0: none */
    int64_t window;        /* 0: none */
    const float *sinks;    /* [H] or NULL */
    int64_t num_items;
    const int64_t *items;  /* [num_items, 6]: row_lo, row_hi, slot, keys, pos, part */
    int64_t num_rows;
    const int64_t *row_q, *row_pos;          /* [num_rows] */
    const int64_t *part_ptr, *part_idx;      /* [num_rows + 1], [num_parts]: CSR of each row's partials */
    float *part_acc;       /* [num_parts, H, D] */
    float *part_ml;        /* [num_parts, H, 2]: running max, sum of exponentials */
    int64_t threads;
    int64_t kv_bf16;       /* 1: k, v hold bfloat16 values (each task widens its keys into its scratch) */
} PagedArgs;

/* 16 floats in one vector (one AVX-512 register; GCC splits it where the CPU has narrower ones). */
typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
typedef float vf_unaligned __attribute__((vector_size(64), aligned(4)));
typedef int vi_unaligned __attribute__((vector_size(64), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh_unaligned __attribute__((vector_size(32), aligned(2)));  /* 16 bfloat16 values */
#define LANES 16
#define LOAD(p) (*(const vf_unaligned *)(p))
#define STORE(p, x) (*(vf_unaligned *)(p) = (x))
#define LOAD_INT(p) (*(const vi_unaligned *)(p))
#define LANES_MIN 6  /* from this many query vectors per task on, they go along the lanes */

static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

static inline vf blend(vi mask, vf yes, vf no) {  /* mask lanes are 0 or -1 */
    return (vf)((mask & (vi)yes) | (~mask & (vi)no));
}

static inline float hsum(vf x) {
    x += __builtin_shuffle(x, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    x += __builtin_shuffle(x, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    x += __builtin_shuffle(x, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    x += __builtin_shuffle(x, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return x[0];
}

static inline float hmax(vf x) {
    vf y;
    y = __builtin_shuffle(x, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    x = blend(x > y, x, y);
    y = __builtin_shuffle(x, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    x = blend(x > y, x, y);
    y = __builtin_shuffle(x, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    x = blend(x > y, x, y);
    y = __builtin_shuffle(x, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    x = blend(x > y, x, y);
    return x[0];
}

/* e^r for |r| <= ln(2) / 2 (Cephes expf's polynomial): the part of e^x left after range reduction. */
static inline vf exp_reduced(vf r) {
    vf y = splat(1.9875691500e-4f);
    y = y * r + splat(1.3981999507e-3f);
    y = y * r + splat(8.3334519073e-3f);
    y = y * r + splat(4.1665795894e-2f);
    y = y * r + splat(1.6666665459e-1f);
    y = y * r + splat(5.0000001201e-1f);
    return y * r * r + r + splat(1.f);
}

/* e^x per lane (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1e-7 relative error);
 * lanes below -87 (masked keys: -inf) give exactly 0. */
static inline vf vexp(vf x) {
    const vi underflow = x < splat(-87.f);
    x = blend(x > splat(88.f), splat(88.f), x);
    x = blend(underflow, splat(-87.f), x);
    vf fx = x * splat(1.44269504088896341f) + splat(0.5f);
    vi n = __builtin_convertvector(fx, vi);
    vf nf = __builtin_convertvector(n, vf);
    n -= (vi)(nf > fx) & (vi){1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};  /* floor */
    nf = __builtin_convertvector(n, vf);
    x = x - nf * splat(0.693359375f) + nf * splat(2.12194440e-4f);
    const vf y = exp_reduced(x);
    vi bits = (n + (vi){127, 127, 127, 127, 127, 127, 127, 127, 127, 127, 127, 127, 127, 127, 127, 127}) << 23;
    return blend(underflow, splat(0.f), y * (vf)bits);
}

#ifdef __AVX512F__
#include <immintrin.h>
/* e^x of the softmax (x <= 0, or -inf for masked keys): vexp's polynomial on AVX-512's rounding and
 * scaling instructions (14 operations instead of ~24); lanes below -87 give exactly 0, as in vexp. */
static inline vf vexp_softmax(vf x) {
    const __m512 xm = (__m512)x;
    const __mmask16 keep = _mm512_cmp_ps_mask(xm, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xm, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xm);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    return (vf)_mm512_maskz_scalef_ps(keep, (__m512)exp_reduced((vf)r), n);
}
#else
#define vexp_softmax vexp
#endif

static inline float dot(const float *a, const float *b, int64_t dim) {
    vf acc = LOAD(a) * LOAD(b);
    for (int64_t c = LANES; c < dim; c += LANES) acc += LOAD(a + c) * LOAD(b + c);
    return hsum(acc);
}

#define KEY_BLOCK 64  /* keys per online-softmax step of the lanes path */
#define TRANSPOSED_MIN 10  /* from this many query vectors in a lanes pass on, transposed accumulators */

/* Many query vectors (LANES_MIN or more): up to 16 of them along the lanes of one vector, so a key's
 * scores for all of them are D broadcast FMAs, and their softmax runs lane-wise, KEY_BLOCK keys at a time
 * (the rescaling of the accumulators and the running max/sum are paid once per block). q: [nq, D]
 * scaled; lanes i0 .. i0 + n - 1 of it; lo, hi: each row's visible keys (query vector i is row i / G). */
static void attend_lanes(const PagedArgs *a, const float *q, int64_t i0, int64_t n, const int64_t *lo,
                         const int64_t *hi, int64_t first, int64_t last, const float *kh, const float *vh,
                         float *acc, float *m, float *l, float *qt) {
    const int64_t D = a->dim, G = a->heads / a->kv_heads;
    int lo_lane[LANES], hi_lane[LANES];
    int64_t lo_max = 0, hi_min = last;  /* keys [lo_max, hi_min) are visible to every lane in use */
    for (int64_t i = 0; i < LANES; i++) {
        lo_lane[i] = i < n ? (int)lo[(i0 + i) / G] : 0;
        hi_lane[i] = i < n ? (int)hi[(i0 + i) / G] : 0;  /* padding lanes see nothing */
        if (i < n && lo_lane[i] > lo_max) lo_max = lo_lane[i];
        if (i < n && hi_lane[i] < hi_min) hi_min = hi_lane[i];
        for (int64_t d = 0; d < D; d++) qt[d * LANES + i] = i < n ? q[(i0 + i) * D + d] : 0.f;
    }
    /* More than TRANSPOSED_MIN vectors: the accumulators in acc_t [D, LANES], query vectors along the
     * lanes (a value row is one load for all of them); fewer: in acc, a vector's dims along the lanes
     * (the transposed form would compute every lane for the few in use). */
    const int transposed = n >= TRANSPOSED_MIN;
    float *acc_t = qt + D * LANES;
    if (transposed) memset(acc_t, 0, sizeof(float) * D * LANES);
    const vi lo_v = LOAD_INT(lo_lane), hi_v = LOAD_INT(hi_lane);
    vf mv = splat(-INFINITY), lv = splat(0.f);
    float sc[KEY_BLOCK * LANES];   /* [key, lane]: scores, then probabilities */
    for (int64_t j0 = first; j0 < last; j0 += KEY_BLOCK) {
        const int64_t nb = last - j0 < KEY_BLOCK ? last - j0 : KEY_BLOCK;
        for (int64_t j = 0; j < nb; j += 4) {  /* four keys per pass over the queries (fewer loads) */
            const float *k0 = kh + (j0 + j) * D;
            const float *k1 = j + 1 < nb ? k0 + D : k0, *k2 = j + 2 < nb ? k0 + 2 * D : k0;
            const float *k3 = j + 3 < nb ? k0 + 3 * D : k0;
            vf s0 = splat(0.f), s1 = s0, s2 = s0, s3 = s0;
            for (int64_t d = 0; d < D; d++) {
                const vf qd = LOAD(qt + d * LANES);
                s0 += qd * splat(k0[d]);
                s1 += qd * splat(k1[d]);
                s2 += qd * splat(k2[d]);
                s3 += qd * splat(k3[d]);
            }
            STORE(sc + j * LANES, s0);
            STORE(sc + (j + 1) * LANES, s1);
            STORE(sc + (j + 2) * LANES, s2);
            STORE(sc + (j + 3) * LANES, s3);
        }
        const int masked = j0 < lo_max || j0 + nb > hi_min;  /* some lane in use does not see some key */
        vf bmax = splat(-INFINITY);
        for (int64_t j = 0; j < nb; j++) {
            vf sj = LOAD(sc + j * LANES);
            if (a->softcap > 0.f)
                for (int64_t i = 0; i < LANES; i++) sj[i] = a->softcap * tanhf(sj[i] / a->softcap);
            if (masked) {
                const vi visible = ((int)(j0 + j) >= lo_v) & ((int)(j0 + j) < hi_v);
                sj = blend(visible, sj, splat(-INFINITY));
            }
            bmax = blend(sj > bmax, sj, bmax);
            STORE(sc + j * LANES, sj);
        }
        const vf m_new = blend(bmax > mv, bmax, mv);
        const vf m_safe = blend(m_new == splat(-INFINITY), splat(0.f), m_new);  /* no key yet: no nan */
        const vf c = vexp_softmax(mv - m_safe);
        vf sum = splat(0.f);
        for (int64_t j = 0; j < nb; j++) {
            const vf p = vexp_softmax(LOAD(sc + j * LANES) - m_safe);
            STORE(sc + j * LANES, p);
            sum += p;
        }
        lv = lv * c + sum;
        mv = m_new;
        if (transposed) {  /* acc_t[d] = acc_t[d] * c + sum_j p_j * v[j, d], 16 dims at a time */
            for (int64_t d0 = 0; d0 < D; d0 += LANES) {
                vf t[LANES];
                for (int u = 0; u < LANES; u++) t[u] = LOAD(acc_t + (d0 + u) * LANES) * c;
                for (int64_t j = 0; j < nb; j++) {
                    const vf pj = LOAD(sc + j * LANES);
                    const float *vj = vh + (j0 + j) * D + d0;
                    for (int u = 0; u < LANES; u++) t[u] += pj * splat(vj[u]);
                }
                for (int u = 0; u < LANES; u++) STORE(acc_t + (d0 + u) * LANES, t[u]);
            }
            continue;
        }
        float corr[LANES];
        STORE(corr, c);
        for (int64_t i = 0; i < n; i += 4) {  /* four query vectors per pass over the values */
            const int64_t i1 = i + 1 < n ? i + 1 : i, i2 = i + 2 < n ? i + 2 : i, i3 = i + 3 < n ? i + 3 : i;
            float *a0 = acc + (i0 + i) * D, *a1 = acc + (i0 + i1) * D;
            float *a2 = acc + (i0 + i2) * D, *a3 = acc + (i0 + i3) * D;
            for (int64_t cc = 0; cc < D; cc += LANES) {
                vf y0 = LOAD(a0 + cc) * splat(corr[i]), y1 = LOAD(a1 + cc) * splat(corr[i1]);
                vf y2 = LOAD(a2 + cc) * splat(corr[i2]), y3 = LOAD(a3 + cc) * splat(corr[i3]);
                for (int64_t j = 0; j < nb; j++) {
                    const vf vj = LOAD(vh + (j0 + j) * D + cc);
                    const float *pj = sc + j * LANES;
                    y0 += splat(pj[i]) * vj;
                    y1 += splat(pj[i1]) * vj;
                    y2 += splat(pj[i2]) * vj;
                    y3 += splat(pj[i3]) * vj;
                }
                /* a repeated vector (n not a multiple of 4) is stored last, with its own value */
                STORE(a3 + cc, y3);
                STORE(a2 + cc, y2);
                STORE(a1 + cc, y1);
                STORE(a0 + cc, y0);
            }
        }
    }
    if (transposed)
        for (int64_t i = 0; i < n; i++)
            for (int64_t d = 0; d < D; d++) acc[(i0 + i) * D + d] = acc_t[d * LANES + i];
    for (int64_t i = 0; i < n; i++) {
        m[i0 + i] = mv[i];
        l[i0 + i] = lv[i];
    }
}

/* keys [first, last) of a bfloat16 run (row stride D) into float32 rows of dst, at the same row indices */
static void widen_rows(float *dst, const uint16_t *src, int64_t first, int64_t last, int64_t D) {
    for (int64_t j = first; j < last; j++)
        for (int64_t c = 0; c < D; c += LANES) {
            const vu w = __builtin_convertvector(*(const vh_unaligned *)(src + j * D + c), vu) << 16;
            STORE(dst + j * D + c, (vf)w);
        }
}

/* One item for one kv head: its rows x the G query heads of h, over the item's keys. */
static void attend_item(const PagedArgs *a, const int64_t *item, int64_t h, void *buf) {
    const int64_t D = a->dim, G = a->heads / a->kv_heads;
    const int64_t row_lo = item[0], rows = item[1] - item[0], slot = item[2], keys = item[3];
    const int64_t pos0 = item[4], part = item[5], nq = rows * G;
    int64_t *lo = (int64_t *)buf, *hi = lo + rows;  /* the visible keys of each row: [lo, hi) */
    float *q = (float *)(hi + rows); /* [nq, D] scaled queries */
    float *acc = q + nq * D;        /* [nq, D] */
    float *m = acc + nq * D;        /* [nq] */
    float *l = m + nq;              /* [nq] */
    float *s = l + nq;              /* [nq, LANES] scores of one key block; the lanes path: [D, LANES] */
    int64_t first = keys, last = 0;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t pos = a->row_pos[row_lo + r];
        int64_t end = pos - pos0 + 1, start = 0;
        if (a->window > 0 && pos - a->window + 1 - pos0 > 0) start = pos - a->window + 1 - pos0;
        if (end > keys) end = keys;
        lo[r] = start;
        hi[r] = end > start ? end : start;
        if (hi[r] > lo[r]) {
            if (lo[r] < first) first = lo[r];
            if (hi[r] > last) last = hi[r];
        }
        const float *qr = a->q + a->row_q[row_lo + r] * a->q_stride_t;
        for (int64_t g = 0; g < G; g++) {
            const float *src = qr + (h * G + g) * a->q_stride_h;
            float *dst = q + (r * G + g) * D;
            for (int64_t c = 0; c < D; c += LANES) STORE(dst + c, LOAD(src + c) * splat(a->scale));
        }
    }
    memset(acc, 0, sizeof(float) * nq * D);
    for (int64_t i = 0; i < nq; i++) { m[i] = -INFINITY; l[i] = 0.f; }
    const float *kh = a->k + h * a->kv_stride_h + slot * D, *vh = a->v + h * a->kv_stride_h + slot * D;
    if (a->kv_bf16) {  /* bfloat16 pool: the keys this item reads, widened once into the scratch */
        float *kw = s + (nq > 2 * D ? nq : 2 * D) * LANES, *vw = kw + keys * D;
        const uint16_t *k16 = (const uint16_t *)a->k + h * a->kv_stride_h + slot * D;
        const uint16_t *v16 = (const uint16_t *)a->v + h * a->kv_stride_h + slot * D;
        widen_rows(kw, k16, first, last, D);
        widen_rows(vw, v16, first, last, D);
        kh = kw;
        vh = vw;
    }
    if (nq >= LANES_MIN) {
        for (int64_t i0 = 0; i0 < nq; i0 += LANES) {
            const int64_t n = nq - i0 < LANES ? nq - i0 : LANES;
            attend_lanes(a, q, i0, n, lo, hi, first, last, kh, vh, acc, m, l, s);
        }
        goto write;
    }
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t j0 = first; j0 < last; j0 += LANES) {
        const int64_t nb = last - j0 < LANES ? last - j0 : LANES;
        for (int64_t j = 0; j < nb; j++) {
            const float *kj = kh + (j0 + j) * D;
            for (int64_t i = 0; i < nq; i++) s[i * LANES + j] = dot(q + i * D, kj, D);
        }
        for (int64_t r = 0; r < rows; r++) {
            /* key j0 + lane is visible to row r */
            const vi key = lane + (int)j0;
            const vi visible = (key >= (int)lo[r]) & (key < (int)hi[r]) & (lane < (int)nb);
            for (int64_t g = 0; g < G; g++) {
                const int64_t i = r * G + g;
                float *si = s + i * LANES;
                if (a->softcap > 0.f)
                    for (int64_t j = 0; j < nb; j++) si[j] = a->softcap * tanhf(si[j] / a->softcap);
                const vf x = blend(visible, LOAD(si), splat(-INFINITY));
                const float block_max = hmax(x);
                if (block_max == -INFINITY) {  /* no visible key of this row in the block */
                    STORE(si, splat(0.f));
                    continue;
                }
                const float m_new = block_max > m[i] ? block_max : m[i];
                const float correction = expf(m[i] - m_new);  /* 0 on the first visible block */
                const vf p = vexp(x - splat(m_new));
                STORE(si, p);
                l[i] = l[i] * correction + hsum(p);
                m[i] = m_new;
                float *ai = acc + i * D;
                for (int64_t c = 0; c < D; c += LANES) {
                    vf y = LOAD(ai + c) * splat(correction);
                    for (int64_t j = 0; j < nb; j++) y += splat(si[j]) * LOAD(vh + (j0 + j) * D + c);
                    STORE(ai + c, y);
                }
            }
        }
    }
write:
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < G; g++) {
            const int64_t i = r * G + g, p = (part + r) * a->heads + h * G + g;
            memcpy(a->part_acc + p * D, acc + i * D, sizeof(float) * D);
            a->part_ml[2 * p] = m[i];
            a->part_ml[2 * p + 1] = l[i];
        }
    }
}

static inline void axpy(float *y, float w, const float *x, int64_t dim) {
    for (int64_t c = 0; c < dim; c += LANES) STORE(y + c, LOAD(y + c) + splat(w) * LOAD(x + c));
}

static inline void scal(float *y, float w, int64_t dim) {
    for (int64_t c = 0; c < dim; c += LANES) STORE(y + c, LOAD(y + c) * splat(w));
}

static void merge_row(const PagedArgs *a, int64_t r) {
    const int64_t D = a->dim, H = a->heads;
    const int64_t first = a->part_ptr[r], last = a->part_ptr[r + 1];
    float *out = a->out + a->row_q[r] * H * D;
    for (int64_t hq = 0; hq < H; hq++) {
        float m = -INFINITY;
        for (int64_t i = first; i < last; i++) {
            const float mi = a->part_ml[2 * (a->part_idx[i] * H + hq)];
            if (mi > m) m = mi;
        }
        float *o = out + hq * D;
        memset(o, 0, sizeof(float) * D);
        if (m == -INFINITY) continue;  /* sees no key: weighs nothing */
        float l = 0.f;
        for (int64_t i = first; i < last; i++) {
            const int64_t p = a->part_idx[i] * H + hq;
            const float w = expf(a->part_ml[2 * p] - m);
            l += w * a->part_ml[2 * p + 1];
            if (w != 0.f) axpy(o, w, a->part_acc + p * D, D);
        }
        float norm = 1.f / l;
        if (a->sinks) norm *= 1.f / (1.f + expf(a->sinks[hq] - m - logf(l)));  /* sigmoid(lse - sink) */
        scal(o, norm, D);
    }
}

/* Bytes of scratch one task needs for an item of `rows` rows and `keys` keys (see attend_item). */
static size_t task_bytes(const PagedArgs *a, int64_t rows, int64_t keys) {
    const int64_t nq = rows * (a->heads / a->kv_heads);
    const int64_t widened = a->kv_bf16 ? 2 * keys * a->dim : 0;  /* float32 copies of a bf16 item's K, V */
    return sizeof(int64_t) * 2 * rows
           + sizeof(float) * (nq * (2 * a->dim + 2) + (nq > 2 * a->dim ? nq : 2 * a->dim) * LANES + widened);
}

int paged_attention(const PagedArgs *a) {
    int64_t max_rows = 0, max_keys = 0;
    for (int64_t t = 0; t < a->num_items; t++) {
        const int64_t rows = a->items[6 * t + 1] - a->items[6 * t], keys = a->items[6 * t + 3];
        if (rows > max_rows) max_rows = rows;
        if (keys > max_keys) max_keys = keys;
    }
    const size_t scratch = task_bytes(a, max_rows, max_keys);
    const int64_t tasks = a->num_items * a->kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(a->threads)
    {
        void *buf = malloc(scratch);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (buf) attend_item(a, a->items + 6 * (t / a->kv_heads), t % a->kv_heads, buf);
        }
        free(buf);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < a->num_rows; r++) merge_row(a, r);
    }
    return failed;
}

/* Pin the calling thread's OpenMP team, thread i to cpus[i] (libgomp keeps a team's threads for the
 * master's later parallel regions, so the pinning lasts). Returns 0, or 1 if a thread could not be. */
int bind_threads(const int64_t *cpus, int64_t n) {
    int failed = 0;
#pragma omp parallel num_threads(n)
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET((int)cpus[omp_get_thread_num()], &set);
        if (sched_setaffinity(0, sizeof(set), &set)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    return failed;
}

/* ---- fused elementwise work of a decoder layer (model/fused_cpu.py) ---- */

/* y[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w: float32 rows of `dim` (a multiple of 16) */
void rms_norm(const float *x, int64_t x_stride, const float *w, float *y, int64_t rows, int64_t dim,
              float eps, int64_t threads) {
#pragma omp parallel for num_threads(rows > 16 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        vf acc = splat(0.f);
        for (int64_t c = 0; c < dim; c += LANES) acc += LOAD(xr + c) * LOAD(xr + c);
        const float inv = 1.f / sqrtf(hsum(acc) / (float)dim + eps);
        float *yr = y + r * dim;
        for (int64_t c = 0; c < dim; c += LANES) STORE(yr + c, LOAD(w + c) * (LOAD(xr + c) * splat(inv)));
    }
}

/* out[r] = silu(gate[r]) * up[r] = gate / (1 + e^-gate) * up: float32 rows of `dim` (a multiple of 16) */
void silu_mul(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride, float *out,
              int64_t rows, int64_t dim, int64_t threads) {
#pragma omp parallel for num_threads(rows > 16 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + r * gate_stride, *u = up + r * up_stride;
        float *o = out + r * dim;
        for (int64_t c = 0; c < dim; c += LANES) {
            const vf x = LOAD(g + c);
            STORE(o + c, x / (splat(1.f) + vexp(-x)) * LOAD(u + c));
        }
    }
}
