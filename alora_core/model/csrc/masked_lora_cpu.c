/* The masked-LoRA delta of a step's rows on the CPU (float32), in place: one call per wrapped linear.
 *
 * Built with paged_attention_cpu.c into one library (alora_core/model/cpu_kernels.py). Semantics (the
 * oracle is lora.ops.masked_lora_reference):
 *
 *   for row r with slot s = index[r], 0 <= s < num_slots and a_t[s] set:
 *     h = x[r] @ a_t[s]                    a_t[s]: A^T [in, rank[s]], row-major
 *     y[r] += (scale[s] * h) @ b_t[s]      b_t[s]: B^T [rank[s], out], row-major
 *
 * Rows with another slot (-1: base rows, aLoRA rows before their invocation; an adapter that does not
 * target this layer) are untouched. Every row is computed on its own, in the same order whichever other
 * rows the step holds. Rows go to threads when there are several (a fan-out's forks, each with its own
 * adapter); one row stays on the calling thread (no team wake-up for a decode step's ~30k FMAs).
 *
 * x, y and the weights are all float32 or all bfloat16 (`bf16`); bf16 values are widened to float32,
 * h stays float32 (torch's bf16 path rounds it to bf16 between its two GEMMs), and y[r] is rounded to
 * bf16 once, to nearest even, as torch rounds.
 *
 * Why: the torch path spends its time in dispatch, not arithmetic. Per wrapped linear of the bench
 * model (512 wide, rank 32) a decode row is an mm + addmm, ~25 us in a running engine; four forks with
 * four adapters are index_select, two bmm, index_select, index_add_, ~125 us.
 */
#include <stdint.h>
#include <string.h>

typedef struct {
    const float *x;  /* [rows, in] strides (x_stride, 1) */
    int64_t x_stride;
    float *y;        /* [rows, out] strides (y_stride, 1): may be a column view of a fused product */
    int64_t y_stride;
    int64_t rows, in, out;
    const int64_t *index;     /* [rows] slot of each row, -1 for none */
    int64_t num_slots;        /* length of the four tables below */
    const float *const *a_t;  /* per slot: A^T or NULL (the slot's adapter does not target this layer) */
    const float *const *b_t;  /* per slot: B^T */
    const int64_t *rank;      /* per slot, at most MASKED_LORA_MAX_RANK */
    const float *scale;       /* per slot */
    int64_t threads;
    int64_t bf16;             /* 1: x, y, a_t, b_t hold bfloat16 (uint16) values; 0: float32 */
} LoraArgs;

#define MASKED_LORA_MAX_RANK 256 /* the caller serves larger ranks with torch */
#define OUT_BLOCK 64             /* output columns accumulated together over the rank */

static inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* element i of a float32 or bfloat16 array (bf16 is a constant where this is inlined) */
static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void lora_row(const LoraArgs *a, int64_t r, int bf16) {
    const int64_t s = a->index[r];
    if (s < 0 || s >= a->num_slots || a->a_t[s] == 0) return;
    const int64_t rank = a->rank[s], in = a->in, out = a->out, width = bf16 ? 2 : 4;
    const char *x = (const char *)a->x + r * a->x_stride * width;
    const void *at = a->a_t[s], *bt = a->b_t[s];
    float h[MASKED_LORA_MAX_RANK];
    for (int64_t j = 0; j < rank; j++) h[j] = 0.f;
    for (int64_t k = 0; k < in; k++) {  /* shrink: A^T's rows in order, the rank along the lanes */
        const float xk = load(x, k, bf16);
        const int64_t row = k * rank;
        for (int64_t j = 0; j < rank; j++) h[j] += xk * load(at, row + j, bf16);
    }
    const float scale = a->scale[s];
    for (int64_t j = 0; j < rank; j++) h[j] *= scale;
    char *y = (char *)a->y + r * a->y_stride * width;
    for (int64_t c0 = 0; c0 < out; c0 += OUT_BLOCK) {  /* expand: a block of y in registers */
        const int64_t n = out - c0 < OUT_BLOCK ? out - c0 : OUT_BLOCK;
        float acc[OUT_BLOCK] = {0.f};
        for (int64_t j = 0; j < rank; j++) {
            const float hj = h[j];
            const int64_t row = j * out + c0;
            for (int64_t c = 0; c < n; c++) acc[c] += hj * load(bt, row + c, bf16);
        }
        if (bf16) {
            uint16_t *yb = (uint16_t *)y + c0;
            for (int64_t c = 0; c < n; c++) yb[c] = to_bf16(from_bf16(yb[c]) + acc[c]);
        } else {
            float *yf = (float *)y + c0;
            for (int64_t c = 0; c < n; c++) yf[c] += acc[c];
        }
    }
}

static void lora_row_f32(const LoraArgs *a, int64_t r) { lora_row(a, r, 0); }
static void lora_row_bf16(const LoraArgs *a, int64_t r) { lora_row(a, r, 1); }

void masked_lora(const LoraArgs *a) {
    const int64_t threads = a->threads < a->rows ? a->threads : a->rows;
    void (*row)(const LoraArgs *, int64_t) = a->bf16 ? lora_row_bf16 : lora_row_f32;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < a->rows; r++) row(a, r);
}
