/* Kernels of the CPU fast paths (dfl/kernels/winograd.py, fused_layer.py, folded_inference.py), loaded by
 * dfl/kernels/native/__init__.py. Rows are channels-last [time, C] float32 with C % 8 == 0; loops over rows run on
 * OpenMP threads.
 *
 * Winograd F(4,3) along time: a 3-tap conv with dilation d gives 4 outputs t, t+d, t+2d, t+3d from the 6
 * inputs t-d … t+4d through 6 channel-mixing products (GEMMs) instead of 12. A tile item is one such group
 * of 4 outputs: item k is phase k % d of block k / d, a block being 4d rows. The conv and its backward
 * run GROUP items at a time through transform → GEMM → transform, all in per-thread buffers that
 * stay in cache, with a register-blocked GEMM (MR × 16 accumulators), so activations are read and written
 * once.
 *
 * Work is split into a fixed number of chunks (CHUNKS, independent of the thread count) that threads take
 * dynamically: on a shared machine a thread the hypervisor pauses no longer holds up the others at the
 * end of each kernel. Sums (batch-norm moments, gradients) are accumulated per chunk and added in chunk
 * order, so results do not depend on scheduling or on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
#define LOAD(p) (*(const v8 *)(p))
#define STORE(p, v) (*(v8 *)(p) = (v))

static inline v8 leaky_relu(v8 y, float slope) {
    const v8 zero = {0};
    v8i negative = y < zero;
    v8 scaled = y * slope;
    return (v8)(((v8i)y & ~negative) | ((v8i)scaled & negative));
}

static inline v8 bcast(float f) { return (v8){f, f, f, f, f, f, f, f}; }

/* The norm as the activation sees it, s·z + c per channel. The backward kernels recompute it from z
 * for the leaky ReLU's mask: the same expression gives the same bits as the forward pass, so the
 * activation itself need not be read back. */
static inline v8 affine(const float *z, const float *s, const float *c) { return LOAD(z) * LOAD(s) + LOAD(c); }

/* dy: the leaky ReLU's input gradient, g where s·z + c > 0, slope·g elsewhere. */
static inline v8 leaky_grad(v8 g, v8 pre, float slope) {
    const v8 zero = {0};
    v8i negative = pre <= zero;
    return (v8)(((v8i)g & ~negative) | ((v8i)(g * slope) & negative));
}

#define GROUP 48 /* tile items per GEMM pass, a multiple of MR: their operands stay in L2 */
#define MR 6  /* GEMM micro-tile: MR rows × 16 columns (12 accumulators) */
#define NR 16

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

static inline int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline int thread_num(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#ifndef CHUNKS
#define CHUNKS 16
#endif
static inline int64_t chunk_count(int64_t units) { return units < CHUNKS ? units : CHUNKS; }
/* Chunk ch of `chunks` covers units [chunk_start(ch), chunk_start(ch + 1)). Sizes shrink from about 2/chunks
 * of the work to 1/chunks² (quadratic boundaries), so the chunks left when one thread runs out of work are
 * small and the other finishes soon after. */
static inline int64_t chunk_start(int64_t ch, int64_t chunks, int64_t units) {
    return units - units * (chunks - ch) * (chunks - ch) / (chunks * chunks);
}

static float *alloc_floats(size_t n) { return aligned_alloc(64, round_up((int64_t)(n * sizeof(float)), 64)); }

/* Tile items: rows = 4d·blocks + rest outputs give d items per whole block and min(d, rest) in the last,
 * partial one, whose missing inputs read as zero and whose missing outputs are not written. */
static inline int64_t tile_items(int64_t rows, int64_t d) {
    const int64_t rest = rows % (4 * d);
    return rows / (4 * d) * d + (rest < d ? rest : d);
}

/* First output row of item k. */
static inline int64_t item_row(int64_t k, int64_t d) { return k / d * 4 * d + k % d; }

/* A conv's input: row r (output row t reads r = t − d, t, t + d) is x[r] for lo <= r < hi and zero elsewhere.
 * With a norm (scale != NULL) it is leaky_relu(scale·x[r] + offset): the previous layer's activation,
 * computed as it is read instead of stored. */
typedef struct {
    const float *x;
    int64_t lo, hi;
    const float *scale, *offset;
    float slope;
} source_t;

static inline v8 normed(const float *row, const float *zeros, const source_t *src, int64_t c) {
    if (row == zeros) return (v8){0};
    return leaky_relu(affine(row + c, src->scale + c, src->offset + c), src->slope);
}

/* Below STAGED_BELOW, items interleave in memory (item k's rows are t, t + d, …, a few rows apart) and a
 * group reads and writes them in the order the rows lie in memory, through its buffers: block by block (4d
 * rows), and in a block row by row, the j-th row of each of its items in turn; item by item, the rows would
 * come out of order, which the hardware prefetchers follow badly (20-30 % slower layers at d = 1 … 4). From
 * STAGED_BELOW on, a group's items are consecutive rows of each of their 6 (4) row streams, read (written)
 * item by item with no staging, which costs less there. */
#define STAGED_BELOW 16

/* The group's items r0 … r1 − 1 in block blk. */
static inline void block_items(int64_t blk, int64_t k0, int64_t n, int64_t d, int64_t *r0, int64_t *r1) {
    *r0 = blk * d > k0 ? blk * d - k0 : 0;
    *r1 = (blk + 1) * d - k0 < n ? (blk + 1) * d - k0 : n;
}

/* u[i·plane + c] = (Bᵀ x)[i] for one channel block of an item's 6 input values. */
static inline void transform_block(v8 x0, v8 x1, v8 x2, v8 x3, v8 x4, v8 x5, float *u, int64_t plane) {
    STORE(u, 4.f * x0 - 5.f * x2 + x4);
    STORE(u + plane, x3 + x4 - 4.f * (x1 + x2));
    STORE(u + 2 * plane, 4.f * (x1 - x2) + x4 - x3);
    STORE(u + 3 * plane, 2.f * (x3 - x1) + x4 - x2);
    STORE(u + 4 * plane, 2.f * (x1 - x3) + x4 - x2);
    STORE(u + 5 * plane, 4.f * x1 - 5.f * x3 + x5);
}

/* u[i·plane + c] = (Bᵀ s)[i]: the 6 GEMM operands from an item's 6 input rows (through src's norm, if any;
 * rows == zeros stay zero). */
static inline void input_transform(const float *const s[6], float *u, int64_t plane, int64_t C, const source_t *src,
                                   const float *zeros) {
    if (src && src->scale)
        for (int64_t c = 0; c < C; c += 8)
            transform_block(normed(s[0], zeros, src, c), normed(s[1], zeros, src, c), normed(s[2], zeros, src, c),
                            normed(s[3], zeros, src, c), normed(s[4], zeros, src, c), normed(s[5], zeros, src, c),
                            u + c, plane);
    else
        for (int64_t c = 0; c < C; c += 8)
            transform_block(LOAD(s[0] + c), LOAD(s[1] + c), LOAD(s[2] + c), LOAD(s[3] + c), LOAD(s[4] + c),
                            LOAD(s[5] + c), u + c, plane);
}

/* The 4 outputs (A m)[j] of one channel block of an item, from its 6 GEMM products m[i·plane]. */
static inline void output_block(const float *m, int64_t plane, v8 out[4]) {
    v8 m0 = LOAD(m), m1 = LOAD(m + plane), m2 = LOAD(m + 2 * plane);
    v8 m3 = LOAD(m + 3 * plane), m4 = LOAD(m + 4 * plane), m5 = LOAD(m + 5 * plane);
    v8 sum12 = m1 + m2, diff12 = m1 - m2, sum34 = m3 + m4, diff34 = m3 - m4;
    out[0] = m0 + sum12 + sum34, out[1] = diff12 + 2.f * diff34, out[2] = sum12 + 4.f * sum34;
    out[3] = diff12 + 8.f * diff34 + m5;
}

/* The 4 output rows t + j·d (those < rows) of an item from its 6 GEMM products m[i·plane], + bias, leaky ReLU. */
static inline void output_transform(const float *m, int64_t plane, const float *bias, float slope, int activate,
                                    float *y, int64_t t, int64_t d, int64_t rows, int64_t C) {
    for (int64_t c = 0; c < C; c += 8) {
        v8 out[4], b = bias ? LOAD(bias + c) : (v8){0};
        output_block(m + c, plane, out);
        for (int j = 0; j < 4 && t + j * d < rows; j++)
            STORE(y + (t + j * d) * C + c, activate ? leaky_relu(out[j] + b, slope) : out[j] + b);
    }
}

/* Where an input gradient goes when the input was read through a norm (a source_t with scale): the layer
 * below's z-gradient scale·dy, dy the leaky ReLU's input gradient (from the input gradient and
 * scale·z + offset of that layer's z), with Σdy and Σdy·(z − shift) per channel (that layer's ∂L/∂offset
 * and, with the shift, ∂L/∂scale) added to sums [2][C]. */
typedef struct {
    const float *z, *scale, *offset, *shift;
    float slope;
    double *sums;
} sink_t;

/* output_transform without bias or activation, through a sink; gs [2][C]: the group's float32 sums. */
static inline void output_grad_transform_sink(const float *m, int64_t plane, float *y, int64_t t, int64_t d,
                                              int64_t rows, int64_t C, const sink_t *sink, float *gs) {
    for (int64_t c = 0; c < C; c += 8) {
        v8 out[4], s = LOAD(sink->scale + c), shift = LOAD(sink->shift + c), s1 = LOAD(gs + c), s2 = LOAD(gs + C + c);
        output_block(m + c, plane, out);
        for (int j = 0; j < 4 && t + j * d < rows; j++) {
            const float *z = sink->z + (t + j * d) * C + c;
            v8 dy = leaky_grad(out[j], affine(z, sink->scale + c, sink->offset + c), sink->slope);
            STORE(y + (t + j * d) * C + c, s * dy);
            s1 += dy, s2 += dy * (LOAD(z) - shift);
        }
        STORE(gs + c, s1), STORE(gs + C + c, s2);
    }
}

/* v[i·plane + c] = (A g)[i]: the weight gradient's operands from an item's 4 output-gradient rows. */
static inline void output_grad_transform(const float *const g[4], float *v, int64_t plane, int64_t C) {
    for (int64_t c = 0; c < C; c += 8) {
        v8 g0 = LOAD(g[0] + c), g1 = LOAD(g[1] + c), g2 = LOAD(g[2] + c), g3 = LOAD(g[3] + c);
        v8 even = g0 + g2, odd = g1 + g3, even4 = g0 + 4.f * g2, odd2 = 2.f * g1 + 8.f * g3;
        STORE(v + c, g0);
        STORE(v + plane + c, even + odd);
        STORE(v + 2 * plane + c, even - odd);
        STORE(v + 3 * plane + c, even4 + odd2);
        STORE(v + 4 * plane + c, even4 - odd2);
        STORE(v + 5 * plane + c, g3);
    }
}

/* An item's 6 input rows t + (j − 1)·d of src, the zero row outside [lo, hi). */
static inline void input_rows(const source_t *src, const float *zeros, int64_t t, int64_t d, int64_t C,
                              const float *s[6]) {
    for (int j = 0; j < 6; j++) {
        const int64_t r = t + (j - 1) * d;
        s[j] = r >= src->lo && r < src->hi ? src->x + r * C : zeros;
    }
}

/* The items' 6 input rows t + (j − 1)·d of src (through its norm, zero outside [lo, hi)) into planes j of U
 * (row r of plane j at U + j·plane + r·ld), in memory order. */
static void stage_source_rows(const source_t *src, const float *zeros, int64_t k0, int64_t n, int64_t d, int64_t C,
                              float *U, int64_t plane, int64_t ld) {
    for (int64_t blk = k0 / d; blk <= (k0 + n - 1) / d; blk++) {
        int64_t r0, r1;
        block_items(blk, k0, n, d, &r0, &r1);
        for (int j = 0; j < 6; j++)
            for (int64_t r = r0; r < r1; r++) {
                const int64_t row = item_row(k0 + r, d) + (j - 1) * d;
                const float *x = row >= src->lo && row < src->hi ? src->x + row * C : zeros;
                float *u = U + j * plane + r * ld;
                for (int64_t c = 0; c < C; c += 8) STORE(u + c, src->scale ? normed(x, zeros, src, c) : LOAD(x + c));
            }
    }
}

/* The 6-plane transform of each of n staged items (item r's rows at U + j·plane + r·ld), in place. */
static void transform_staged(float *U, int64_t n, int64_t plane, int64_t ld, int64_t C) {
    for (int64_t r = 0; r < n; r++) {
        const float *s[6];
        for (int j = 0; j < 6; j++) s[j] = U + j * plane + r * ld;
        input_transform(s, U + r * ld, plane, C, NULL, NULL); /* reads each channel block's 6 values first */
    }
}

/* Output j (A m)[j] of one channel block of an item: output_block's arithmetic, one output at a time. */
static inline v8 output_row_block(const float *m, int64_t plane, int j) {
    const v8 m1 = LOAD(m + plane), m2 = LOAD(m + 2 * plane), m3 = LOAD(m + 3 * plane), m4 = LOAD(m + 4 * plane);
    switch (j) {
    case 0: return LOAD(m) + (m1 + m2) + (m3 + m4);
    case 1: return (m1 - m2) + 2.f * (m3 - m4);
    case 2: return (m1 + m2) + 4.f * (m3 + m4);
    default: return (m1 - m2) + 8.f * (m3 - m4) + LOAD(m + 5 * plane);
    }
}

/* output_transform (with a sink: output_grad_transform_sink, gs its sums) for a group's n items (item r's
 * products at M + r·ldm, planes GROUP·ldm apart), in memory order. */
static void store_outputs_staged(const float *M, int64_t ldm, int64_t k0, int64_t n, int64_t d, int64_t rows,
                                 const float *bias, float slope, int activate, float *y, int64_t C,
                                 const sink_t *sink, float *gs) {
    for (int64_t blk = k0 / d; blk <= (k0 + n - 1) / d; blk++) {
        int64_t r0, r1;
        block_items(blk, k0, n, d, &r0, &r1);
        for (int j = 0; j < 4; j++)
            for (int64_t r = r0; r < r1; r++) {
                const int64_t t = item_row(k0 + r, d) + j * d;
                if (t >= rows) continue;
                for (int64_t c = 0; c < C; c += 8) {
                    const v8 out = output_row_block(M + r * ldm + c, GROUP * ldm, j);
                    if (sink) {
                        const float *z = sink->z + t * C + c;
                        const v8 dy = leaky_grad(out, affine(z, sink->scale + c, sink->offset + c), sink->slope);
                        STORE(y + t * C + c, LOAD(sink->scale + c) * dy);
                        STORE(gs + c, LOAD(gs + c) + dy);
                        STORE(gs + C + c, LOAD(gs + C + c) + dy * (LOAD(z) - LOAD(sink->shift + c)));
                    } else {
                        const v8 v = out + (bias ? LOAD(bias + c) : (v8){0});
                        STORE(y + t * C + c, activate ? leaky_relu(v, slope) : v);
                    }
                }
            }
    }
}

/* M[MR][ldm] = A[MR][lda] (first K columns) @ B[K][NR] */
static inline void gemm_tile(const float *A, int64_t lda, const float *B, int64_t K, float *M, int64_t ldm) {
    v8 c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0};
    v8 c30 = {0}, c31 = {0}, c40 = {0}, c41 = {0}, c50 = {0}, c51 = {0};
    for (int64_t k = 0; k < K; k++) {
        v8 b0 = LOAD(B + k * NR), b1 = LOAD(B + k * NR + 8), a;
        a = bcast(A[k]), c00 += a * b0, c01 += a * b1;
        a = bcast(A[lda + k]), c10 += a * b0, c11 += a * b1;
        a = bcast(A[2 * lda + k]), c20 += a * b0, c21 += a * b1;
        a = bcast(A[3 * lda + k]), c30 += a * b0, c31 += a * b1;
        a = bcast(A[4 * lda + k]), c40 += a * b0, c41 += a * b1;
        a = bcast(A[5 * lda + k]), c50 += a * b0, c51 += a * b1;
    }
    STORE(M, c00), STORE(M + 8, c01), STORE(M + ldm, c10), STORE(M + ldm + 8, c11);
    STORE(M + 2 * ldm, c20), STORE(M + 2 * ldm + 8, c21), STORE(M + 3 * ldm, c30), STORE(M + 3 * ldm + 8, c31);
    STORE(M + 4 * ldm, c40), STORE(M + 4 * ldm + 8, c41), STORE(M + 5 * ldm, c50), STORE(M + 5 * ldm + 8, c51);
}

/* The filter transform: the 6 GEMM weights of an item are G · (the 3 taps). */
static const double G[6][3] = {{1. / 4, 0, 0},           {-1. / 6, -1. / 6, -1. / 6}, {-1. / 6, 1. / 6, -1. / 6},
                               {1. / 24, 1. / 12, 1. / 6}, {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};

/* Conv weight w [Cout][Cin][3] → its Winograd weights W [6][Cin][Cout], W[i] = Σ_k G[i][k]·w[:, :, k]ᵀ;
 * flipped: those of the input gradient's conv (taps flipped, channels swapped), [6][Cout][Cin]. */
void dfl_winograd_weights(const float *w, int64_t Cout, int64_t Cin, int flipped, float *W) {
    for (int64_t o = 0; o < Cout; o++)
        for (int64_t m = 0; m < Cin; m++) {
            const float *taps = w + (o * Cin + m) * 3;
            for (int i = 0; i < 6; i++) {
                double v = 0;
                for (int k = 0; k < 3; k++) v += G[i][k] * taps[flipped ? 2 - k : k];
                W[flipped ? (i * Cout + o) * Cin + m : (i * Cin + m) * Cout + o] = (float)v;
            }
        }
}

/* The chain rule through G: the Winograd weights' gradient [6][Cin][Cout] → the conv weight's gradient
 * [Cout][Cin][3], summed in float64 (the 6 terms cancel to much smaller tap gradients). */
void dfl_winograd_taps_grad(const float *grad, int64_t Cin, int64_t Cout, float *taps_grad) {
    for (int64_t o = 0; o < Cout; o++)
        for (int64_t m = 0; m < Cin; m++)
            for (int k = 0; k < 3; k++) {
                double v = 0;
                for (int i = 0; i < 6; i++) v += G[i][k] * grad[(i * Cin + m) * Cout + o];
                taps_grad[(o * Cin + m) * 3 + k] = (float)v;
            }
}

/* Winograd weights W [6][Cin][Cout] packed per 16-column panel, zero beyond Cout: B[i][panel][Cin][16]. */
static float *pack_weights(const float *W, int64_t Cin, int64_t Cout) {
    const int64_t panels = (Cout + NR - 1) / NR;
    float *B = alloc_floats(6 * panels * Cin * NR);
    if (!B) return NULL;
    for (int64_t i = 0; i < 6; i++)
        for (int64_t j = 0; j < panels; j++)
            for (int64_t k = 0; k < Cin; k++)
                for (int64_t c = 0; c < NR; c++)
                    B[((i * panels + j) * Cin + k) * NR + c] = j * NR + c < Cout ? W[(i * Cin + k) * Cout + j * NR + c] : 0.f;
    return B;
}

/* M[i] = U[i] @ W[i] for the first n rows (rounded up to MR) of a group; U [6][GROUP][Cin], M [6][GROUP][ldm]. */
static void group_products(const float *U, const float *B, int64_t n, int64_t Cin, int64_t panels, float *M,
                           int64_t ldm) {
    for (int64_t i = 0; i < 6; i++)
        for (int64_t j = 0; j < panels; j++)
            for (int64_t r0 = 0; r0 < n; r0 += MR)
                gemm_tile(U + (i * GROUP + r0) * Cin, Cin, B + (i * panels + j) * Cin * NR, Cin,
                          M + (i * GROUP + r0) * ldm + j * NR, ldm);
}

/* C[MR][ldc] += A[K][lda]ᵀ-slice (MR columns starting at A) · V[K][ldv] (16 columns). The K products
 * are summed from zero before they are added to C: two-level sums round far less than one long
 * running sum over all of a thread's items. */
static inline void grad_tile(const float *A, int64_t lda, const float *V, int64_t ldv, int64_t K, float *C,
                             int64_t ldc) {
    v8 c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0};
    v8 c30 = {0}, c31 = {0}, c40 = {0}, c41 = {0}, c50 = {0}, c51 = {0};
    for (int64_t k = 0; k < K; k++) {
        const float *a = A + k * lda;
        v8 b0 = LOAD(V + k * ldv), b1 = LOAD(V + k * ldv + 8), s;
        s = bcast(a[0]), c00 += s * b0, c01 += s * b1;
        s = bcast(a[1]), c10 += s * b0, c11 += s * b1;
        s = bcast(a[2]), c20 += s * b0, c21 += s * b1;
        s = bcast(a[3]), c30 += s * b0, c31 += s * b1;
        s = bcast(a[4]), c40 += s * b0, c41 += s * b1;
        s = bcast(a[5]), c50 += s * b0, c51 += s * b1;
    }
    STORE(C, LOAD(C) + c00), STORE(C + 8, LOAD(C + 8) + c01);
    STORE(C + ldc, LOAD(C + ldc) + c10), STORE(C + ldc + 8, LOAD(C + ldc + 8) + c11);
    STORE(C + 2 * ldc, LOAD(C + 2 * ldc) + c20), STORE(C + 2 * ldc + 8, LOAD(C + 2 * ldc + 8) + c21);
    STORE(C + 3 * ldc, LOAD(C + 3 * ldc) + c30), STORE(C + 3 * ldc + 8, LOAD(C + 3 * ldc + 8) + c31);
    STORE(C + 4 * ldc, LOAD(C + 4 * ldc) + c40), STORE(C + 4 * ldc + 8, LOAD(C + 4 * ldc + 8) + c41);
    STORE(C + 5 * ldc, LOAD(C + 5 * ldc) + c50), STORE(C + 5 * ldc + 8, LOAD(C + 5 * ldc + 8) + c51);
}

/* C[i] += U[i]ᵀ V[i] over a group's n items; U [6][GROUP][ldu] (columns ≥ Cin zero), V [6][GROUP][ldv],
 * C [6][mrows][ldv]. */
static void group_grad(const float *U, int64_t ldu, const float *V, int64_t ldv, int64_t n, int64_t mrows, float *C) {
    for (int64_t i = 0; i < 6; i++)
        for (int64_t m0 = 0; m0 < mrows; m0 += MR)
            for (int64_t j = 0; j < ldv; j += NR)
                grad_tile(U + i * GROUP * ldu + m0, ldu, V + i * GROUP * ldv + j, ldv, n, C + (i * mrows + m0) * ldv + j,
                          ldv);
}

/* Moments of a set of rows per channel: their count, mean and sum of squared deviations (float64). */
typedef struct {
    double count, *mean, *m2;
} moments_t;

/* Adds a part (nb rows, mean mb[c], squared deviations m2b[c]) to m (Chan et al.'s pairwise update: no
 * cancellation however far the mean is from zero). */
static void moments_add(moments_t *m, double nb, const double *mb, const double *m2b, int64_t C) {
    if (nb <= 0) return;
    const double na = m->count, n = na + nb;
    for (int64_t c = 0; c < C; c++) {
        const double delta = mb[c] - m->mean[c];
        m->mean[c] += delta * nb / n;
        m->m2[c] += m2b[c] + delta * delta * na * nb / n;
    }
    m->count = n;
}

/* Float32 sums of (row − shift) and (row − shift)² into sums [2][C]. */
static inline void add_row_moments(const float *row, const float *shift, float *sums, int64_t C) {
    for (int64_t c = 0; c < C; c += 8) {
        v8 v = LOAD(row + c) - LOAD(shift + c);
        STORE(sums + c, LOAD(sums + c) + v), STORE(sums + C + c, LOAD(sums + C + c) + v * v);
    }
}

/* Adds `count` rows summed by add_row_moments about `shift` to m (the pairwise update); part: 2·C doubles
 * of scratch. */
static void add_summed_moments(const float *sums, const float *shift, int64_t count, int64_t C, double *part,
                               moments_t *m) {
    for (int64_t c = 0; c < C; c++) {
        const double s = sums[c];
        part[c] = shift[c] + s / count;
        part[C + c] = (double)sums[C + c] - s * s / count;
    }
    moments_add(m, (double)count, part, part + C, C);
}

/* Adds a group's output rows (those of items k0 … k0 + n − 1 below `rows`) to m: float32 sums about the
 * group's first row (a sample, so near the mean), then the pairwise update. The rows are still in cache.
 * part: 2·C doubles of scratch. */
static void group_moments(const float *y, int64_t k0, int64_t n, int64_t d, int64_t rows, int64_t C, float *sums,
                          double *part, moments_t *m) {
    const float *shift = y + item_row(k0, d) * C;
    memset(sums, 0, sizeof(float) * 2 * C);
    int64_t count = 0;
    for (int64_t r = 0; r < n; r++) {
        const int64_t t = item_row(k0 + r, d);
        for (int64_t j = 0; j < 4 && t + j * d < rows; j++, count++) add_row_moments(y + (t + j * d) * C, shift, sums, C);
    }
    add_summed_moments(sums, shift, count, C, part, m);
}

/* y[t] = act(Σ_k x[t + (k − 1)·d] @ W_k + bias) for t < rows, x the source (see source_t), by Winograd with
 * W [6][Cin][Cout] the transformed weights. With `moments` (2·Cout doubles), also writes the outputs'
 * per-channel mean and sum of squared deviations there (what batch norm needs, from rows still in cache),
 * merged chunk by chunk in chunk order. Returns −1 when out of memory. */
int dfl_wino43_conv(const float *x, int64_t lo, int64_t hi, const float *in_scale, const float *in_offset,
                    float in_slope, int64_t rows, int64_t Cin, int64_t Cout, int64_t d, const float *W,
                    const float *bias, float slope, int activate, float *y, double *moments) {
    const source_t src = {x, lo, hi, in_scale, in_offset, in_slope};
    const int64_t items = tile_items(rows, d), groups = (items + GROUP - 1) / GROUP, chunks = chunk_count(groups);
    const int64_t panels = (Cout + NR - 1) / NR, ldm = panels * NR;
    float *B = pack_weights(W, Cin, Cout);
    double *stats = moments ? calloc((size_t)chunks * 2 * Cout + 1, sizeof(double)) : NULL; /* mean, m2 */
    double *counts = moments ? calloc((size_t)chunks + 1, sizeof(double)) : NULL;
    if (!B || (moments && (!stats || !counts))) {
        free(B), free(stats), free(counts);
        return -1;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *U = alloc_floats(6 * GROUP * Cin + Cin), *M = alloc_floats(6 * GROUP * ldm + 2 * Cout);
        double *scratch = malloc(sizeof(double) * 2 * Cout);
        float *zeros = U ? U + 6 * GROUP * Cin : NULL, *sums = M ? M + 6 * GROUP * ldm : NULL;
        if (!U || !M || !scratch) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(U, 0, sizeof(float) * (6 * GROUP * Cin + Cin));
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < chunks; ch++) {
            if (!U || !M || !scratch) continue;
            moments_t part = {0, stats ? stats + ch * 2 * Cout : NULL, stats ? stats + ch * 2 * Cout + Cout : NULL};
            for (int64_t g = chunk_start(ch, chunks, groups); g < chunk_start(ch + 1, chunks, groups); g++) {
                const int64_t k0 = g * GROUP, n = items - k0 < GROUP ? items - k0 : GROUP;
                if (d < STAGED_BELOW) {
                    stage_source_rows(&src, zeros, k0, n, d, Cin, U, GROUP * Cin, Cin);
                    transform_staged(U, n, GROUP * Cin, Cin, Cin);
                } else
                    for (int64_t r = 0; r < n; r++) {
                        const float *s[6];
                        input_rows(&src, zeros, item_row(k0 + r, d), d, Cin, s);
                        input_transform(s, U + r * Cin, GROUP * Cin, Cin, &src, zeros);
                    }
                group_products(U, B, n, Cin, panels, M, ldm);
                if (d < STAGED_BELOW)
                    store_outputs_staged(M, ldm, k0, n, d, rows, bias, slope, activate, y, Cout, NULL, NULL);
                else
                    for (int64_t r = 0; r < n; r++)
                        output_transform(M + r * ldm, GROUP * ldm, bias, slope, activate, y, item_row(k0 + r, d), d, rows, Cout);
                if (moments) group_moments(y, k0, n, d, rows, Cout, sums, scratch, &part);
            }
            if (counts) counts[ch] = part.count;
        }
        free(U), free(M), free(scratch);
    }
    if (moments && !failed) {
        moments_t total = {0, moments, moments + Cout};
        memset(moments, 0, sizeof(double) * 2 * Cout);
        for (int64_t ch = 0; ch < chunks; ch++)
            moments_add(&total, counts[ch], stats + ch * 2 * Cout, stats + ch * 2 * Cout + Cout, Cout);
    }
    free(B), free(stats), free(counts);
    return failed ? -1 : 0;
}

/* Row `row` of a conv's output gradient, dz = g + b·z + e per channel (b, e: batch norm's statistics
 * gradients; g: the gradient from above, for rows < n; zero outside the conv's rows 0 … rows). */
static inline void conv_output_grad(const float *g, const float *z, const float *b, const float *e, int64_t row,
                                    int64_t n, int64_t rows, int64_t C, float *out) {
    for (int64_t c = 0; c < C; c += 8) {
        v8 v = {0};
        if (row >= 0 && row < rows) {
            v = LOAD(b + c) * LOAD(z + row * C + c) + LOAD(e + c);
            if (row < n) v += LOAD(g + row * C + c);
        }
        STORE(out + c, v);
    }
}

/* The backward of dfl_wino43_conv (no bias, no activation) in one pass. The conv's output gradient is
 * formed on the fly, dz = g + b·z + e per channel for conv rows r < rows (g: the z-gradient from above, for
 * r < n; b, e: batch norm's statistics gradients), and feeds both dx[t] = Σ_k dz[t − (k−1)·d] @ W_kᵀ for
 * t < n (Wf: the Winograd weights of the flipped, transposed taps, [6][Cout][Cin]) and
 * grad[6][Cin][Cout] += Σ Uᵢᵀ Vᵢ (U = Bᵀx, V = A·dz); x: the source, as for the conv. When x is read through
 * a norm (in_scale) and below_sums is given, dx receives the layer below's z-gradient instead, through a
 * sink_t (shift: below_shift), and below_sums [2][Cin] its sums. Each chunk sums its weight gradient and
 * sums in its own buffers, added in chunk order. */
int dfl_wino43_conv_backward(const float *g, const float *z, int64_t n, int64_t rows, const float *b, const float *e,
                             const float *x, int64_t lo, int64_t hi, const float *in_scale, const float *in_offset,
                             float in_slope, const float *Wf, int64_t Cin, int64_t Cout, int64_t d, float *dx,
                             float *grad, const float *below_shift, double *below_sums) {
    const source_t src = {x, lo, hi, in_scale, in_offset, in_slope};
    const sink_t sink = {x, in_scale, in_offset, below_shift, in_slope, below_sums}; /* x: the layer below's z */
    const int sunk = below_sums && in_scale;
    const int64_t items = tile_items(rows, d), groups = (items + GROUP - 1) / GROUP, chunks = chunk_count(groups);
    const int64_t panels = (Cin + NR - 1) / NR, ldm = panels * NR; /* the dx conv: Cout → Cin */
    const int64_t ldu = round_up(Cin, MR) + 8, mrows = round_up(Cin, MR), ldv = round_up(Cout, NR);
    const size_t acc_size = 6 * mrows * ldv;
    float *B = pack_weights(Wf, Cout, Cin), *acc = alloc_floats(chunks * acc_size + 1);
    double *sink_acc = sunk ? calloc((size_t)chunks * 2 * Cin + 1, sizeof(double)) : NULL;
    if (!B || !acc || (sunk && !sink_acc)) {
        free(B), free(acc), free(sink_acc);
        return -1;
    }
    const int64_t widest = Cin > Cout ? Cin : Cout;
    int failed = 0;
#pragma omp parallel
    {
        float *Ud = alloc_floats(6 * GROUP * Cout), *M = alloc_floats(6 * GROUP * ldm);
        float *Ux = alloc_floats(6 * GROUP * ldu), *V = alloc_floats(6 * GROUP * ldv);
        float *zeros = alloc_floats(widest > 2 * Cin ? widest : 2 * Cin), *gs = alloc_floats(2 * Cin);
        if (!Ud || !M || !Ux || !V || !zeros || !gs) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(Ud, 0, sizeof(float) * 6 * GROUP * Cout), memset(Ux, 0, sizeof(float) * 6 * GROUP * ldu);
            memset(V, 0, sizeof(float) * 6 * GROUP * ldv), memset(zeros, 0, sizeof(float) * widest);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < chunks; ch++) {
            float *C = acc + ch * acc_size;
            memset(C, 0, sizeof(float) * acc_size);
            if (!Ud || !M || !Ux || !V || !zeros || !gs) continue;
            for (int64_t gr = chunk_start(ch, chunks, groups); gr < chunk_start(ch + 1, chunks, groups); gr++) {
                const int64_t k0 = gr * GROUP, n_items = items - k0 < GROUP ? items - k0 : GROUP;
                /* the items' dz rows t − d … t + 4d, into Ud's 6 planes in memory order (see STAGED_BELOW; formed
                 * row by row anyway, so at every dilation) */
                for (int64_t blk = k0 / d; blk <= (k0 + n_items - 1) / d; blk++) {
                    int64_t r0, r1;
                    block_items(blk, k0, n_items, d, &r0, &r1);
                    for (int j = 0; j < 6; j++)
                        for (int64_t r = r0; r < r1; r++)
                            conv_output_grad(g, z, b, e, item_row(k0 + r, d) + (j - 1) * d, n, rows, Cout,
                                             Ud + j * GROUP * Cout + r * Cout);
                }
                if (d < STAGED_BELOW) stage_source_rows(&src, zeros, k0, n_items, d, Cin, Ux, GROUP * ldu, ldu);
                for (int64_t r = 0; r < n_items; r++) {
                    const float *s[6];
                    for (int j = 0; j < 6; j++) s[j] = Ud + j * GROUP * Cout + r * Cout;
                    output_grad_transform(s + 1, V + r * ldv, GROUP * ldv, Cout);
                    input_transform(s, Ud + r * Cout, GROUP * Cout, Cout, NULL, NULL); /* in place: reads all 6 rows first */
                    if (d >= STAGED_BELOW) {
                        input_rows(&src, zeros, item_row(k0 + r, d), d, Cin, s);
                        input_transform(s, Ux + r * ldu, GROUP * ldu, Cin, &src, zeros);
                    }
                }
                if (d < STAGED_BELOW) transform_staged(Ux, n_items, GROUP * ldu, ldu, Cin);
                group_products(Ud, B, n_items, Cout, panels, M, ldm);
                if (sunk) memset(gs, 0, sizeof(float) * 2 * Cin);
                if (d < STAGED_BELOW)
                    store_outputs_staged(M, ldm, k0, n_items, d, n, NULL, 0.f, 0, dx, Cin, sunk ? &sink : NULL, gs);
                else if (sunk)
                    for (int64_t r = 0; r < n_items; r++)
                        output_grad_transform_sink(M + r * ldm, GROUP * ldm, dx, item_row(k0 + r, d), d, n, Cin, &sink, gs);
                else
                    for (int64_t r = 0; r < n_items; r++)
                        output_transform(M + r * ldm, GROUP * ldm, NULL, 0.f, 0, dx, item_row(k0 + r, d), d, n, Cin);
                if (sunk)
                    for (int64_t c = 0; c < 2 * Cin; c++) sink_acc[ch * 2 * Cin + c] += gs[c];
                group_grad(Ux, ldu, V, ldv, n_items, mrows, C);
            }
        }
        free(Ud), free(M), free(Ux), free(V), free(zeros), free(gs);
        if (!failed) { /* the chunks' sums, each element's in chunk order */
#pragma omp for schedule(static)
            for (int64_t im = 0; im < 6 * Cin; im++)
                for (int64_t c = 0; c < Cout; c++) {
                    float *to = grad + im * Cout + c;
                    for (int64_t ch = 0; ch < chunks; ch++) *to += acc[ch * acc_size + (im / Cin * mrows + im % Cin) * ldv + c];
                }
        }
    }
    if (sunk && !failed)
        for (int64_t ch = 0; ch < chunks; ch++)
            for (int64_t c = 0; c < 2 * Cin; c++) below_sums[c] += sink_acc[ch * 2 * Cin + c];
    free(sink_acc), free(B), free(acc);
    return failed ? -1 : 0;
}

/* Per-channel moments of `rows` rows about `shift` (k), added in float64 to sums[0:C] and sums[C:2C]:
 * Σ (z−k) and Σ (z−k)². A shift near the mean keeps the variance free of cancellation. Blocks of 64 rows
 * are summed in float32 vectors, then added in float64 per chunk; the chunks' sums are added in chunk
 * order. Returns -1 when out of memory. */
#define MOMENT_BLOCK 64
int dfl_channel_moments(const float *z, const float *shift, int64_t rows, int64_t C, double *sums) {
    const int threads = max_threads();
    const int64_t n_blocks = (rows + MOMENT_BLOCK - 1) / MOMENT_BLOCK, chunks = chunk_count(n_blocks);
    double *partial = calloc((size_t)chunks * 2 * C + 1, sizeof(double));
    float *blocks = alloc_floats((size_t)threads * 2 * C);
    if (!partial || !blocks) {
        free(partial), free(blocks);
        return -1;
    }
    const v8 zero = {0};
#pragma omp parallel num_threads(threads)
    {
        const int t = thread_num();
        float *bs = blocks + (size_t)t * 2 * C, *bq = bs + C;
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < chunks; ch++) {
            double *s = partial + (size_t)ch * 2 * C, *q = s + C;
            for (int64_t blk = chunk_start(ch, chunks, n_blocks); blk < chunk_start(ch + 1, chunks, n_blocks); blk++) {
                const int64_t r1 = (blk + 1) * MOMENT_BLOCK < rows ? (blk + 1) * MOMENT_BLOCK : rows;
                for (int64_t c = 0; c < C; c += 8) STORE(bs + c, zero), STORE(bq + c, zero);
                for (int64_t r = blk * MOMENT_BLOCK; r < r1; r++)
                    for (int64_t c = 0; c < C; c += 8) {
                        v8 v = LOAD(z + r * C + c) - LOAD(shift + c);
                        STORE(bs + c, LOAD(bs + c) + v);
                        STORE(bq + c, LOAD(bq + c) + v * v);
                    }
                for (int64_t c = 0; c < C; c++) s[c] += bs[c], q[c] += bq[c];
            }
        }
    }
    for (int64_t ch = 0; ch < chunks; ch++)
        for (int64_t c = 0; c < 2 * C; c++) sums[c] += partial[(size_t)ch * 2 * C + c];
    free(partial), free(blocks);
    return 0;
}

/* Mean and (biased) variance of B parts' moments ([B][2][C] as dfl_wino43_conv writes them; rows[b] rows
 * each, or `each` rows with rows NULL), merged in order by the pairwise update, into stats [2][C]. Returns
 * the row count. */
static double merge_moments(const double *parts, const int64_t *rows, int64_t each, int64_t B, int64_t C,
                            double *stats) {
    double *var = stats + C;
    moments_t m = {0, stats, var}; /* var holds the squared deviations until divided */
    memset(stats, 0, sizeof(double) * 2 * C);
    for (int64_t b = 0; b < B; b++)
        moments_add(&m, (double)(rows ? rows[b] : each), parts + b * 2 * C, parts + b * 2 * C + C, C);
    for (int64_t c = 0; c < C; c++) var[c] = var[c] > 0 ? var[c] / m.count : 0;
    return m.count;
}

void dfl_merge_moments(const double *parts, const int64_t *rows, int64_t B, int64_t C, double *stats) {
    merge_moments(parts, rows, 0, B, C, stats);
}

/* A layer's norm α·z + β·(γ·(z − mean)/√(var + eps) + bias) as scale·z + offset per channel: the float64 twin of
 * dfl/kernels/norm_affine.py's affine (tests/test_native.py checks them against each other). mean and var:
 * those of `parts` (B batch items' moments as dfl_wino43_conv writes them, [B][2][C], `rows` rows each,
 * merged in order), or with parts NULL the running statistics. With momentum ≥ 0, the running statistics
 * are updated as BatchNorm does in training (variance unbiased). out [3][C]: scale, offset, mean (float32);
 * stats [2][C]: mean, var in float64 for dfl_norm_backward. gamma NULL: γ = 1. */
void dfl_norm_forward(const double *parts, int64_t B, int64_t rows, int64_t C, const float *alpha, const float *beta,
                      const float *gamma, const float *bias, double eps, double momentum, float *running_mean,
                      float *running_var, float *out, double *stats) {
    double *mean = stats, *var = stats + C;
    if (parts) {
        const double count = merge_moments(parts, NULL, rows, B, C, stats);
        if (momentum >= 0)
            for (int64_t c = 0; c < C; c++) {
                running_mean[c] = (float)((1 - momentum) * running_mean[c] + momentum * mean[c]);
                running_var[c] = (float)((1 - momentum) * running_var[c] + momentum * var[c] * count / (count - 1));
            }
    } else
        for (int64_t c = 0; c < C; c++) mean[c] = running_mean[c], var[c] = running_var[c];
    for (int64_t c = 0; c < C; c++) {
        const double g = (gamma ? gamma[c] : 1.0) / sqrt(var[c] + eps);
        out[c] = (float)(*alpha + *beta * g);
        out[C + c] = (float)(*beta * (bias[c] - g * mean[c]));
        out[2 * C + c] = (float)mean[c];
    }
}

/* The backward of dfl_norm_forward for ∂L/∂scale and ∂L/∂offset (NULL: zero), over `count` rows. grads
 * [2 + 2C] gets ∂L/∂α, ∂L/∂β, ∂L/∂γ [C], ∂L/∂bias [C] (float64); coefficients [2][C] gets b and e, with
 * which the gradient reaching the conv output z through batch statistics (batch ≠ 0) is b·z + e. */
void dfl_norm_backward(const double *stats, int64_t count, int64_t C, const float *beta, const float *gamma,
                       const float *bias, double eps, int batch, const float *grad_scale, const float *grad_offset,
                       double *grads, float *coefficients) {
    const double *mean = stats, *var = stats + C;
    grads[0] = grads[1] = 0;
    for (int64_t c = 0; c < C; c++) {
        const double s = grad_scale ? grad_scale[c] : 0, o = grad_offset ? grad_offset[c] : 0;
        const double gm = gamma ? gamma[c] : 1.0, r = 1 / sqrt(var[c] + eps), g = gm * r;
        grads[0] += s;
        grads[1] += s * g + o * (bias[c] - g * mean[c]);
        grads[2 + c] = *beta * r * (s - o * mean[c]);
        grads[2 + C + c] = *beta * o;
        double b = 0, e = 0;
        if (batch) {
            const double d_mean = -*beta * g * o, d_var = *beta * gm * (s - o * mean[c]) * -0.5 * r * r * r;
            b = 2 * d_var / count, e = d_mean / count - b * mean[c];
        }
        coefficients[c] = (float)b, coefficients[C + c] = (float)e;
    }
}

/* ∂L/∂scale and ∂L/∂offset of a layer read through scale·z + offset, from the sums Σdy and Σdy·(z − shift)
 * (float64 [2][C]) its reader's backward adds: Σdy·z = Σdy·(z − shift) + shift·Σdy. out [2][C]. */
void dfl_norm_grads(const double *sums, const float *shift, int64_t C, float *out) {
    for (int64_t c = 0; c < C; c++) out[c] = (float)(sums[C + c] + shift[c] * sums[c]), out[C + c] = (float)sums[c];
}

/* A strided conv with bias and leaky ReLU (the frozen loss network's layers): y[t] = leaky_relu(bias +
 * Σ_k x[stride·t + k] @ W[k]) for t < n_out, x [rows][Cin] with the padding in the buffer, W [K·Cin][Cout]
 * (Cout a multiple of 16). Output t's K input rows lie side by side in x, so all K taps are one GEMM operand
 * of K·Cin columns whose rows are stride·Cin apart (overlapping when K > stride). −1 when out of memory. */
#define STRIDED_BLOCK 96 /* output rows per task, a multiple of MR */
int dfl_strided_conv(const float *x, int64_t n_out, int64_t Cin, int64_t Cout, int64_t stride, int64_t K,
                     const float *W, const float *bias, float slope, float *y) {
    const int64_t depth = K * Cin, panels = Cout / NR, blocks = (n_out + STRIDED_BLOCK - 1) / STRIDED_BLOCK;
    float *B = alloc_floats((size_t)panels * depth * NR); /* W per 16-column panel: [panel][depth][16] */
    if (!B) return -1;
    for (int64_t j = 0; j < panels; j++)
        for (int64_t k = 0; k < depth; k++) memcpy(B + (j * depth + k) * NR, W + k * Cout + j * NR, sizeof(float) * NR);
    int failed = 0;
#pragma omp parallel
    {
        /* the last, partial tile: its rows copied (and zero-padded) so no row past the input is read */
        float *rows = alloc_floats((size_t)MR * depth), *out = alloc_floats((size_t)MR * Cout * K);
        float *tap = out ? out + MR * Cout : NULL; /* taps 1 … K − 1 */
        if (!rows || !out) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < blocks; blk++) {
            if (!rows || !out) continue;
            const int64_t t1 = (blk + 1) * STRIDED_BLOCK < n_out ? (blk + 1) * STRIDED_BLOCK : n_out;
            for (int64_t t0 = blk * STRIDED_BLOCK; t0 < t1; t0 += MR) {
                const int64_t m = t1 - t0 < MR ? t1 - t0 : MR;
                const float *a = x + t0 * stride * Cin;
                int64_t lda = stride * Cin;
                if (m < MR) {
                    memset(rows, 0, sizeof(float) * MR * depth);
                    for (int64_t r = 0; r < m; r++) memcpy(rows + r * depth, a + r * lda, sizeof(float) * depth);
                    a = rows, lda = depth;
                }
                /* tap by tap, the taps' sums added after: shorter float32 chains than one sum over K·Cin */
                for (int64_t k = 0; k < K; k++)
                    for (int64_t j = 0; j < panels; j++)
                        gemm_tile(a + k * Cin, lda, B + (j * depth + k * Cin) * NR, Cin,
                                  (k ? tap + (k - 1) * MR * Cout : out) + j * NR, Cout);
                for (int64_t r = 0; r < m; r++)
                    for (int64_t c = 0; c < Cout; c += 8) {
                        v8 v = LOAD(out + r * Cout + c);
                        for (int64_t k = 1; k < K; k++) v += LOAD(tap + ((k - 1) * MR + r) * Cout + c);
                        STORE(y + (t0 + r) * Cout + c, leaky_relu(v + LOAD(bias + c), slope));
                    }
            }
        }
        free(rows), free(out);
    }
    free(B);
    return failed ? -1 : 0;
}

/* Σ|a − b| over n floats (a layer's activations for two signals: the feature loss's distance), without
 * writing the difference: float32 sums of blocks, float64 per chunk, chunks added in order. */
#define DIFF_BLOCK 1024
double dfl_abs_diff_sum(const float *a, const float *b, int64_t n) {
    const int64_t blocks = (n + DIFF_BLOCK - 1) / DIFF_BLOCK, chunks = chunk_count(blocks);
    double part[CHUNKS] = {0}, total = 0;
    const v8i magnitude = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                           0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t ch = 0; ch < chunks; ch++)
        for (int64_t blk = chunk_start(ch, chunks, blocks); blk < chunk_start(ch + 1, chunks, blocks); blk++) {
            const int64_t i0 = blk * DIFF_BLOCK, i1 = i0 + DIFF_BLOCK < n ? i0 + DIFF_BLOCK : n;
            v8 acc = {0};
            int64_t i = i0;
            for (; i + 8 <= i1; i += 8) acc += (v8)((v8i)(LOAD(a + i) - LOAD(b + i)) & magnitude);
            float sum = 0;
            for (; i < i1; i++) sum += fabsf(a[i] - b[i]);
            for (int k = 0; k < 8; k++) sum += acc[k];
            part[ch] += sum;
        }
    for (int64_t ch = 0; ch < chunks; ch++) total += part[ch];
    return total;
}

/* out = (grad + w·sign(a − b)) · (1 where a > 0, else slope): the input gradient of a leaky ReLU whose
 * output a (for the estimate; b for the reference) is in the feature loss with weight w, grad (NULL: zero)
 * the gradient reaching it from the layers above. */
void dfl_feature_grad(const float *grad, const float *a, const float *b, float w, float slope, int64_t n, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n / 8 * 8; i += 8) {
        const v8 d = LOAD(a + i) - LOAD(b + i), zero = {0};
        const v8 sign = __builtin_convertvector((d < zero) - (d > zero), v8);
        STORE(out + i, leaky_grad((grad ? LOAD(grad + i) : zero) + w * sign, LOAD(a + i), slope));
    }
    for (int64_t i = n / 8 * 8; i < n; i++) {
        const float d = a[i] - b[i], g = (grad ? grad[i] : 0.f) + w * (float)((d > 0) - (d < 0));
        out[i] = a[i] > 0 ? g : g * slope;
    }
}

/* out = leaky_relu(scale * z + offset), per channel (out == z: in place). */
void dfl_affine_leaky_relu(const float *z, float *out, int64_t rows, int64_t C, const float *scale,
                           const float *offset, float slope) {
#pragma omp parallel for schedule(dynamic, 1024)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < C; c += 8)
            STORE(out + r * C + c, leaky_relu(affine(z + r * C + c, scale + c, offset + c), slope));
}

/* The output layer, a 1×1 conv to one channel of the last layer's activation, read through its norm as
 * for a source_t: y[t] = Σ_c w[c]·leaky_relu(scale·z[t] + offset)[c] + bias[0] for t < n. */
void dfl_output_conv_deferred_norm(const float *z, int64_t n, int64_t C, const float *scale, const float *offset,
                                   float slope, const float *w, const float *bias, float *y) {
#pragma omp parallel for schedule(dynamic, 1024)
    for (int64_t t = 0; t < n; t++) {
        v8 acc = {0};
        for (int64_t c = 0; c < C; c += 8)
            acc += LOAD(w + c) * leaky_relu(affine(z + t * C + c, scale + c, offset + c), slope);
        y[t] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + bias[0];
    }
}

/* Its backward for t < n: dz[t] = scale·dy (dy = leaky_grad(gy[t]·w) at scale·z + offset, as a sink_t
 * writes it), and per channel sums[0] += Σdy, sums[1] += Σdy·(z − shift), w_grad += Σ gy·activation.
 * Blocks of 64 rows sum in float32, then float64 per chunk, chunks in order. −1 when out of memory. */
#define PROJECT_BLOCK 64
int dfl_output_conv_deferred_norm_backward(const float *gy, const float *z, int64_t n, int64_t C, const float *scale,
                                           const float *offset, float slope, const float *w, const float *shift,
                                           float *dz, double *sums, double *w_grad) {
    const int threads = max_threads();
    const int64_t n_blocks = (n + PROJECT_BLOCK - 1) / PROJECT_BLOCK, chunks = chunk_count(n_blocks);
    double *partial = calloc((size_t)chunks * 3 * C + 1, sizeof(double));
    float *blocks = alloc_floats((size_t)threads * 3 * C);
    if (!partial || !blocks) {
        free(partial), free(blocks);
        return -1;
    }
    const v8 zero = {0};
#pragma omp parallel num_threads(threads)
    {
        const int th = thread_num();
        float *bs = blocks + (size_t)th * 3 * C;
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < chunks; ch++) {
            double *part = partial + (size_t)ch * 3 * C;
            for (int64_t blk = chunk_start(ch, chunks, n_blocks); blk < chunk_start(ch + 1, chunks, n_blocks); blk++) {
                const int64_t r1 = (blk + 1) * PROJECT_BLOCK < n ? (blk + 1) * PROJECT_BLOCK : n;
                for (int64_t c = 0; c < 3 * C; c += 8) STORE(bs + c, zero);
                for (int64_t t = blk * PROJECT_BLOCK; t < r1; t++) {
                    const v8 g = bcast(gy[t]);
                    for (int64_t c = 0; c < C; c += 8) {
                        const float *zr = z + t * C + c;
                        v8 pre = affine(zr, scale + c, offset + c);
                        v8 dy = leaky_grad(g * LOAD(w + c), pre, slope);
                        STORE(dz + t * C + c, LOAD(scale + c) * dy);
                        STORE(bs + c, LOAD(bs + c) + dy);
                        STORE(bs + C + c, LOAD(bs + C + c) + dy * (LOAD(zr) - LOAD(shift + c)));
                        STORE(bs + 2 * C + c, LOAD(bs + 2 * C + c) + g * leaky_relu(pre, slope));
                    }
                }
                for (int64_t c = 0; c < 3 * C; c++) part[c] += bs[c];
            }
        }
    }
    for (int64_t ch = 0; ch < chunks; ch++)
        for (int64_t c = 0; c < C; c++) {
            sums[c] += partial[(size_t)ch * 3 * C + c];
            sums[C + c] += partial[(size_t)ch * 3 * C + C + c];
            w_grad[c] += partial[(size_t)ch * 3 * C + 2 * C + c];
        }
    free(partial), free(blocks);
    return 0;
}

/* A conv with few input channels (the waveform layer), direct: y[t] = Σ_k x[t + (k − 1)·d] @ W[k] for t < rows,
 * x with d zero rows of padding each side ([rows + 2d][Cin], from its row −d), W [3][Cin][Cout]; zero inputs
 * (the channels padded to a multiple of 8) are skipped. With `moments`, as dfl_wino43_conv. −1 when out of
 * memory. */
#define DIRECT_BLOCK 192
int dfl_direct_conv(const float *x, int64_t rows, int64_t Cin, int64_t Cout, int64_t d, const float *W, float *y,
                    double *moments) {
    const int64_t blocks = (rows + DIRECT_BLOCK - 1) / DIRECT_BLOCK, chunks = chunk_count(blocks);
    double *stats = moments ? calloc((size_t)chunks * 2 * Cout + 1, sizeof(double)) : NULL;
    double *counts = moments ? calloc((size_t)chunks + 1, sizeof(double)) : NULL;
    if (moments && (!stats || !counts)) {
        free(stats), free(counts);
        return -1;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *sums = alloc_floats(2 * Cout);
        double *scratch = malloc(sizeof(double) * 2 * Cout);
        if (!sums || !scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < chunks; ch++) {
            if (!sums || !scratch) continue;
            moments_t part = {0, stats ? stats + ch * 2 * Cout : NULL, stats ? stats + ch * 2 * Cout + Cout : NULL};
            for (int64_t blk = chunk_start(ch, chunks, blocks); blk < chunk_start(ch + 1, chunks, blocks); blk++) {
                const int64_t r0 = blk * DIRECT_BLOCK, r1 = r0 + DIRECT_BLOCK < rows ? r0 + DIRECT_BLOCK : rows;
                for (int64_t t = r0; t < r1; t++) {
                    float *out = y + t * Cout;
                    memset(out, 0, sizeof(float) * Cout);
                    for (int k = 0; k < 3; k++)
                        for (int64_t c = 0; c < Cin; c++) {
                            const float v = x[(t + k * d) * Cin + c];
                            if (v == 0.f) continue;
                            const float *w = W + (k * Cin + c) * Cout;
                            for (int64_t o = 0; o < Cout; o += 8) STORE(out + o, LOAD(out + o) + v * LOAD(w + o));
                        }
                }
                if (moments) {
                    memset(sums, 0, sizeof(float) * 2 * Cout);
                    for (int64_t t = r0; t < r1; t++) add_row_moments(y + t * Cout, y + r0 * Cout, sums, Cout);
                    add_summed_moments(sums, y + r0 * Cout, r1 - r0, Cout, scratch, &part);
                }
            }
            if (counts) counts[ch] = part.count;
        }
        free(sums), free(scratch);
    }
    if (moments && !failed) {
        moments_t total = {0, moments, moments + Cout};
        memset(moments, 0, sizeof(double) * 2 * Cout);
        for (int64_t ch = 0; ch < chunks; ch++)
            moments_add(&total, counts[ch], stats + ch * 2 * Cout, stats + ch * 2 * Cout + Cout, Cout);
    }
    free(stats), free(counts);
    return failed ? -1 : 0;
}

/* The weight gradient of dfl_direct_conv only (its input needs none): w_grad[k][Cin][Cout] +=
 * Σ_t x[t + (k − 1)·d] ⊗ dz[t] over t < rows, with the conv's output gradient formed on the fly as in
 * dfl_wino43_conv_backward, dz = g + b·z + e (g for t < n). Zero inputs are skipped. Blocks of rows sum in
 * float32, then float64 per chunk, chunks in order. −1 when out of memory. */
int dfl_direct_conv_weight_grad(const float *g, const float *z, int64_t n, int64_t rows, const float *b,
                                const float *e, const float *x, int64_t Cin, int64_t Cout, int64_t d, double *w_grad) {
    const int64_t size = 3 * Cin * Cout, blocks = (rows + DIRECT_BLOCK - 1) / DIRECT_BLOCK, chunks = chunk_count(blocks);
    double *partial = calloc((size_t)chunks * size + 1, sizeof(double));
    if (!partial) return -1;
    int failed = 0;
#pragma omp parallel
    {
        float *acc = alloc_floats(size + Cout), *dz = acc ? acc + size : NULL;
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < chunks; ch++) {
            if (!acc) continue;
            for (int64_t blk = chunk_start(ch, chunks, blocks); blk < chunk_start(ch + 1, chunks, blocks); blk++) {
                const int64_t r0 = blk * DIRECT_BLOCK, r1 = r0 + DIRECT_BLOCK < rows ? r0 + DIRECT_BLOCK : rows;
                memset(acc, 0, sizeof(float) * size);
                for (int64_t t = r0; t < r1; t++) {
                    conv_output_grad(g, z, b, e, t, n, rows, Cout, dz);
                    for (int k = 0; k < 3; k++)
                        for (int64_t c = 0; c < Cin; c++) {
                            const float v = x[(t + k * d) * Cin + c];
                            if (v == 0.f) continue;
                            float *a = acc + (k * Cin + c) * Cout;
                            for (int64_t o = 0; o < Cout; o += 8) STORE(a + o, LOAD(a + o) + v * LOAD(dz + o));
                        }
                }
                double *part = partial + ch * size;
                for (int64_t i = 0; i < size; i++) part[i] += acc[i];
            }
        }
        free(acc);
    }
    if (!failed)
        for (int64_t ch = 0; ch < chunks; ch++)
            for (int64_t i = 0; i < size; i++) w_grad[i] += partial[ch * size + i];
    free(partial);
    return failed ? -1 : 0;
}
