/* Block-sparse (``bsr``) x dense matmul on the CPU, float32, straight from sparsify's packed layout.

   y (M, N) = x (M, K) @ W^T (+ bias), W (N, K) stored as (sparsify/formats/bsr.py, kernels/reference.py):
     values:  (nnz, R, C) float32, the kept R x C tiles, block-row-major (edge tiles zero-padded)
     col_idx: (nnz,) int32, the block column of each kept tile
     row_ptr: (Br + 1,) int32, offset of each block row's first tile (Br = ceil(N / R))
   Vector path (AVX-512, R % 16 == 0): the kept tiles are first transposed into a scratch copy, (C, R)
   each, so that one weight row k of a tile is R consecutive outputs: 16 outputs are one register, and
   each input x[m, col * C + k] is one broadcast multiply-add into the accumulators of MB tokens. The
   accumulators stay in registers across all kept tiles of a block row, so y is written once. The
   tokens are cut into panels of PANEL rows, small enough to stay in L2 while every block row passes
   over them; (panel, block row) pairs are split over OpenMP threads. Builds without AVX-512, or tiles
   whose R is not a multiple of 16, take the scalar loop (same arithmetic, one output at a time).
   Decode (M < FEW tokens, C % 16 == 0) skips the transposed copy, which would cost more than the
   product: each output row is a dot product of its tiles' rows (16 inputs a register) with the tokens,
   reduced at the end. Only the accumulation order differs from the reference.
*/
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MB 12     /* tokens per register pass (12 accumulators, 1 weight register) */
#define PANEL 96  /* tokens per L2 panel: 96 x K floats */
#define FEW 8     /* below this many tokens: the dot-product path on the stored tiles */

typedef struct {
    const float *x, *wt, *bias; const int32_t *col_idx, *row_ptr; float *y;
    int64_t M, K, N, R, C;
} bsr_t;

/* outputs [o0, o0 + width) of block row br, tokens [m0, m0 + mb), scalar */
static void tile_scalar(const bsr_t *p, int64_t br, int64_t o0, int64_t width, int64_t m0, int64_t mb) {
    for (int64_t m = m0; m < m0 + mb; m++)
        for (int64_t o = o0; o < o0 + width; o++) {
            float acc = 0.0f;
            for (int64_t j = p->row_ptr[br]; j < p->row_ptr[br + 1]; j++) {
                int64_t c0 = (int64_t)p->col_idx[j] * p->C, kmax = p->K - c0 < p->C ? p->K - c0 : p->C;
                const float *w = p->wt + j * p->R * p->C + (o - br * p->R); /* column o of tile j, (C, R) */
                for (int64_t k = 0; k < kmax; k++) acc += w[k * p->R] * p->x[m * p->K + c0 + k];
            }
            p->y[m * p->N + o] = acc + (p->bias ? p->bias[o] : 0.0f);
        }
}

#ifdef __AVX512F__
/* 16 outputs from o0 of block row br for mb (<= MB, a constant after inlining) tokens from m0 */
static inline __attribute__((always_inline)) void tile16(const bsr_t *p, int64_t br, int64_t o0, int64_t m0,
                                                         const int mb) {
    __m512 acc[MB];
    for (int m = 0; m < mb; m++) acc[m] = _mm512_setzero_ps();
    const float *xm = p->x + m0 * p->K;
    for (int64_t j = p->row_ptr[br]; j < p->row_ptr[br + 1]; j++) {
        int64_t c0 = (int64_t)p->col_idx[j] * p->C, kmax = p->K - c0 < p->C ? p->K - c0 : p->C;
        const float *w = p->wt + j * p->R * p->C + (o0 - br * p->R);
        for (int64_t k = 0; k < kmax; k++) {
            __m512 wk = _mm512_loadu_ps(w + k * p->R);
            for (int m = 0; m < mb; m++) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(xm[m * p->K + c0 + k]), wk, acc[m]);
        }
    }
    int64_t left = p->N - o0;
    __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    __m512 b = p->bias ? _mm512_maskz_loadu_ps(mask, p->bias + o0) : _mm512_setzero_ps();
    for (int m = 0; m < mb; m++) _mm512_mask_storeu_ps(p->y + (m0 + m) * p->N + o0, mask, _mm512_add_ps(acc[m], b));
}
#endif

#ifdef __AVX512F__
/* all outputs of block row br for the M (< FEW) tokens, on the stored (R, C) tiles, C % 16 == 0 */
static void row_dots(const bsr_t *p, const float *values, int64_t br) {
    int64_t o_end = (br + 1) * p->R < p->N ? (br + 1) * p->R : p->N;
    for (int64_t o = br * p->R; o < o_end; o++) {
        __m512 acc[FEW];
        for (int64_t m = 0; m < p->M; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t j = p->row_ptr[br]; j < p->row_ptr[br + 1]; j++) {
            int64_t c0 = (int64_t)p->col_idx[j] * p->C;
            const float *w = values + (j * p->R + (o - br * p->R)) * p->C; /* row o of tile j */
            for (int64_t k = 0; k < p->C; k += 16) {
                int64_t left = p->K - c0 - k;
                if (left <= 0) break;
                __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                __m512 wk = _mm512_loadu_ps(w + k);
                for (int64_t m = 0; m < p->M; m++)
                    acc[m] = _mm512_fmadd_ps(wk, _mm512_maskz_loadu_ps(mask, p->x + m * p->K + c0 + k), acc[m]);
            }
        }
        for (int64_t m = 0; m < p->M; m++)
            p->y[m * p->N + o] = _mm512_reduce_add_ps(acc[m]) + (p->bias ? p->bias[o] : 0.0f);
    }
}
#endif

static void block_row(const bsr_t *p, int64_t br, int64_t t0, int64_t t1) {
    int64_t o_end = (br + 1) * p->R < p->N ? (br + 1) * p->R : p->N;
#ifdef __AVX512F__
    if (p->R % 16 == 0) {
        for (int64_t o0 = br * p->R; o0 < o_end; o0 += 16)
            for (int64_t m0 = t0; m0 < t1; m0 += MB) {
                switch (t1 - m0 < MB ? t1 - m0 : MB) { /* constant token counts: the m loops unroll */
                    case 1: tile16(p, br, o0, m0, 1); break;
                    case 2: tile16(p, br, o0, m0, 2); break;
                    case 3: tile16(p, br, o0, m0, 3); break;
                    case 4: tile16(p, br, o0, m0, 4); break;
                    case 5: tile16(p, br, o0, m0, 5); break;
                    case 6: tile16(p, br, o0, m0, 6); break;
                    case 7: tile16(p, br, o0, m0, 7); break;
                    case 8: tile16(p, br, o0, m0, 8); break;
                    case 9: tile16(p, br, o0, m0, 9); break;
                    case 10: tile16(p, br, o0, m0, 10); break;
                    case 11: tile16(p, br, o0, m0, 11); break;
                    default: tile16(p, br, o0, m0, MB); break;
                }
            }
        return;
    }
#endif
    tile_scalar(p, br, br * p->R, o_end - br * p->R, t0, t1 - t0);
}

/* y (M, N) = x (M, K) @ W^T + bias (NULL: none) for a bsr W; returns 0, or -1 when out of memory */
int bsr_linear(const float *x, int64_t M, int64_t K, const float *values, const int32_t *col_idx,
               const int32_t *row_ptr, int64_t N, int64_t R, int64_t C, const float *bias, float *y, int threads) {
    int64_t br_count = (N + R - 1) / R, nnz = row_ptr[br_count], panels = (M + PANEL - 1) / PANEL;
#ifdef __AVX512F__
    if (M < FEW && C % 16 == 0) {
        bsr_t p = {x, NULL, bias, col_idx, row_ptr, y, M, K, N, R, C};
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t br = 0; br < br_count; br++) row_dots(&p, values, br);
        return 0;
    }
#endif
    float *wt = malloc((size_t)(nnz > 0 ? nnz : 1) * R * C * sizeof(float));
    if (!wt) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < nnz; j++) /* each tile (R, C) -> (C, R) */
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < C; c++) wt[(j * C + c) * R + r] = values[(j * R + r) * C + c];
    bsr_t p = {x, wt, bias, col_idx, row_ptr, y, M, K, N, R, C};
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t panel = 0; panel < panels; panel++)
        for (int64_t br = 0; br < br_count; br++) {
            int64_t t0 = panel * PANEL, t1 = t0 + PANEL < M ? t0 + PANEL : M;
            block_row(&p, br, t0, t1);
        }
    free(wt);
    return 0;
}
