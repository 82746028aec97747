/* Kernels of the CPU fast inference path (dfl/fast_inference.py), loaded by dfl/native/__init__.py.
 * Rows are channels-last [time, C] float32 with C % 8 == 0; loops over rows run on OpenMP threads.
 *
 * Winograd F(4,3) transforms along time. A 3-tap conv with dilation d gives 4 outputs t, t+d, t+2d, t+3d from 6 inputs t-d … t+4d.
 * Winograd computes them from 6 channel-mixing products (one GEMM per product) instead of
 * 12, so these transforms turn 6 input rows into the 6 GEMM operands and the 6 GEMM
 * results into 4 output rows (+ bias, leaky ReLU). A tile is `nb` blocks of 4d rows × `np` consecutive phases inside a block;
 * operand i of tile item k lives at U[i * plane + k * C].
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
#define LOAD(p) (*(const v8 *)(p))
#define STORE(p, v) (*(v8 *)(p) = (v))

void dfl_wino43_input(const float *x, int64_t nb, int64_t np, int64_t C, int64_t d, float *U,
                      int64_t plane) {
    const int64_t row = d * C, block = 4 * d * C;
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nb * np; k++) {
        const float *s = x + (k / np) * block + (k % np) * C;
        float *u = U + k * C;
        for (int64_t c = 0; c < C; c += 8) {
            v8 x0 = LOAD(s + c), x1 = LOAD(s + row + c), x2 = LOAD(s + 2 * row + c);
            v8 x3 = LOAD(s + 3 * row + c), x4 = LOAD(s + 4 * row + c), x5 = LOAD(s + 5 * row + c);
            STORE(u + c, 4.f * x0 - 5.f * x2 + x4);
            STORE(u + plane + c, x3 + x4 - 4.f * (x1 + x2));
            STORE(u + 2 * plane + c, 4.f * (x1 - x2) + x4 - x3);
            STORE(u + 3 * plane + c, 2.f * (x3 - x1) + x4 - x2);
            STORE(u + 4 * plane + c, 2.f * (x1 - x3) + x4 - x2);
            STORE(u + 5 * plane + c, 4.f * x1 - 5.f * x3 + x5);
        }
    }
}

static inline v8 leaky_relu(v8 y, float slope) {
    const v8 zero = {0};
    v8i negative = y < zero;
    v8 scaled = y * slope;
    return (v8)(((v8i)y & ~negative) | ((v8i)scaled & negative));
}

void dfl_wino43_output(const float *M, int64_t nb, int64_t np, int64_t C, int64_t d, const float *bias,
                       float slope, int activate, float *y, int64_t plane) {
    const int64_t row = d * C, block = 4 * d * C;
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nb * np; k++) {
        const float *m = M + k * C;
        float *o = y + (k / np) * block + (k % np) * C;
        for (int64_t c = 0; c < C; c += 8) {
            v8 m0 = LOAD(m + c), m1 = LOAD(m + plane + c), m2 = LOAD(m + 2 * plane + c);
            v8 m3 = LOAD(m + 3 * plane + c), m4 = LOAD(m + 4 * plane + c), m5 = LOAD(m + 5 * plane + c);
            v8 b = LOAD(bias + c), sum12 = m1 + m2, diff12 = m1 - m2, sum34 = m3 + m4, diff34 = m3 - m4;
            v8 y0 = m0 + sum12 + sum34 + b, y1 = diff12 + 2.f * diff34 + b;
            v8 y2 = sum12 + 4.f * sum34 + b, y3 = diff12 + 8.f * diff34 + m5 + b;
            if (activate) {
                y0 = leaky_relu(y0, slope), y1 = leaky_relu(y1, slope);
                y2 = leaky_relu(y2, slope), y3 = leaky_relu(y3, slope);
            }
            STORE(o + c, y0), STORE(o + row + c, y1), STORE(o + 2 * row + c, y2), STORE(o + 3 * row + c, y3);
        }
    }
}

/* The weight gradient's second operand: the transpose of the output transform applied to the
 * 4 output-gradient rows of each tile item, V = A·dy (6 planes, like dfl_wino43_input's U). */
void dfl_wino43_output_grad(const float *dy, int64_t nb, int64_t np, int64_t C, int64_t d, float *V,
                            int64_t plane) {
    const int64_t row = d * C, block = 4 * d * C;
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nb * np; k++) {
        const float *g = dy + (k / np) * block + (k % np) * C;
        float *v = V + k * C;
        for (int64_t c = 0; c < C; c += 8) {
            v8 g0 = LOAD(g + c), g1 = LOAD(g + row + c), g2 = LOAD(g + 2 * row + c), g3 = LOAD(g + 3 * row + c);
            v8 even = g0 + g2, odd = g1 + g3, even4 = g0 + 4.f * g2, odd2 = 2.f * g1 + 8.f * g3;
            STORE(v + c, g0);
            STORE(v + plane + c, even + odd);
            STORE(v + 2 * plane + c, even - odd);
            STORE(v + 3 * plane + c, even4 + odd2);
            STORE(v + 4 * plane + c, even4 - odd2);
            STORE(v + 5 * plane + c, g3);
        }
    }
}

/* Per-channel moments of `rows` rows about `shift` (k), added in float64 to sums[0:C] and sums[C:2C]:
 * grad == NULL: Σ (z−k) and Σ (z−k)²; else, with dy = grad where act > 0 and slope·grad elsewhere
 * (the leaky ReLU's gradient), Σ dy and Σ dy·(z−k). A shift near the mean keeps the variance free of
 * cancellation. Blocks of 64 rows are summed in float32 vectors, then
 * added in float64 per thread; the threads' sums are added in thread order, so results do not
 * depend on scheduling. Returns -1 when out of memory. */
#define MOMENT_BLOCK 64
int dfl_channel_moments(const float *z, const float *shift, const float *grad, const float *act, float slope,
                        int64_t rows, int64_t C, double *sums) {
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    double *partial = calloc((size_t)threads * 2 * C, sizeof(double));
    float *blocks = malloc((size_t)threads * 2 * C * sizeof(float));
    if (!partial || !blocks) {
        free(partial), free(blocks);
        return -1;
    }
    const int64_t n_blocks = (rows + MOMENT_BLOCK - 1) / MOMENT_BLOCK;
    const v8 zero = {0};
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        double *s = partial + (size_t)t * 2 * C, *q = s + C;
        float *bs = blocks + (size_t)t * 2 * C, *bq = bs + C;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_blocks; blk++) {
            const int64_t r1 = (blk + 1) * MOMENT_BLOCK < rows ? (blk + 1) * MOMENT_BLOCK : rows;
            for (int64_t c = 0; c < C; c += 8) STORE(bs + c, zero), STORE(bq + c, zero);
            for (int64_t r = blk * MOMENT_BLOCK; r < r1; r++)
                for (int64_t c = 0; c < C; c += 8) {
                    v8 v = LOAD(z + r * C + c) - LOAD(shift + c), w = v;
                    if (grad) {
                        v8 g = LOAD(grad + r * C + c);
                        v8i negative = LOAD(act + r * C + c) <= zero;
                        w = (v8)(((v8i)g & ~negative) | ((v8i)(g * slope) & negative)); /* dy */
                    }
                    STORE(bs + c, LOAD(bs + c) + w);
                    STORE(bq + c, LOAD(bq + c) + w * v);
                }
            for (int64_t c = 0; c < C; c++) s[c] += bs[c], q[c] += bq[c];
        }
    }
    for (int t = 0; t < threads; t++) /* slots of threads that did not run stay zero */
        for (int64_t c = 0; c < 2 * C; c++) sums[c] += partial[(size_t)t * 2 * C + c];
    free(partial), free(blocks);
    return 0;
}

/* out = leaky_relu(scale * z + offset), per channel (out == z: in place). */
void dfl_affine_leaky_relu(const float *z, float *out, int64_t rows, int64_t C, const float *scale,
                           const float *offset, float slope) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < C; c += 8)
            STORE(out + r * C + c, leaky_relu(LOAD(z + r * C + c) * LOAD(scale + c) + LOAD(offset + c), slope));
}

/* Backward of act = leaky_relu(norm(z)) for a norm that is per channel a·z + (batch-statistics terms):
 * out = a·dy + b·z + e, with dy as in dfl_channel_moments (grad == NULL: dy = 0). */
void dfl_norm_act_backward(const float *grad, const float *act, const float *z, int64_t rows, int64_t C,
                           float slope, const float *a, const float *b, const float *e, float *out) {
    const v8 zero = {0};
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < C; c += 8) {
            v8 v = LOAD(b + c) * LOAD(z + r * C + c) + LOAD(e + c);
            if (grad) {
                v8 g = LOAD(grad + r * C + c);
                v8i negative = LOAD(act + r * C + c) <= zero;
                v8 dy = (v8)(((v8i)g & ~negative) | ((v8i)(g * slope) & negative));
                v += LOAD(a + c) * dy;
            }
            STORE(out + r * C + c, v);
        }
}
