/* 2:4 sparse x dense matmul on the CPU, straight from sparsify's packed ``nm`` layout (no unpacking).

   y (M, N) = x (M, K) @ W^T (+ bias), W (N, K) stored as (sparsify/formats/nm.py, kernels/reference.py):
     values: kept values, k = K/2 per row, ascending columns: float32 | int8 codes | int4 codes (uint8,
             two per byte, value j in byte j/2, low nibble = even j)
     meta:   2 bits per kept value, value j at byte (2j)/8, bit (2j)%8; ceil(k/4) bytes per row
     scale:  float32 (N, ngroups); zero: uint8 (N, ngroups) or NULL (int8: 0, int4: 8). Value j lies in
             dense column group (j/2)*4 / group_size; dequant = (code - zero) * scale in float32.
   Each kept weight is dequantized with the reference's formula, then one fused multiply-add per value:
   only the accumulation order differs from the reference.

   AVX-512 path, one block of 16 kept values = 8 groups = 32 dense columns: the 32 inputs are two
   vector loads, and each kept value picks its input with one in-register permute (vpermt2ps) by
   its in-group index from ``meta``: no gather, no dense weight. The weight bytes are read once for
   all M tokens (the M loop is innermost), so decode (small M) runs at the packed bytes' speed. Blocks
   past the last full 32 columns, groups that straddle a block, and builds without AVX-512 take the
   scalar loop. Rows are split over OpenMP threads (the caller passes torch's thread count).
*/
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { KIND_F32 = 0, KIND_I8 = 1, KIND_I4 = 2 };
#define MB 8 /* tokens per accumulator pass */

typedef struct {
    const void *values; const uint8_t *meta; const float *scale; const uint8_t *zero;
    int64_t n_rows, k_in, group_size, ngroups; int kind;
} packed_t;

static inline float weight_at(const packed_t *p, int64_t row, int64_t j) {
    int64_t k = p->k_in / 2, g;
    if (p->kind == KIND_F32) return ((const float *)p->values)[row * k + j];
    g = row * p->ngroups + ((j / 2) * 4) / p->group_size;
    if (p->kind == KIND_I8) return (float)((const int8_t *)p->values)[row * k + j] * p->scale[g];
    uint8_t byte = ((const uint8_t *)p->values)[row * ((k + 1) / 2) + j / 2];
    float code = (float)((j & 1) ? byte >> 4 : byte & 15);
    return (code - (p->zero ? (float)p->zero[g] : 8.0f)) * p->scale[g];
}

static inline int64_t column_at(const packed_t *p, int64_t row, int64_t j) {
    uint8_t byte = p->meta[row * ((p->k_in / 2 + 3) / 4) + j / 4];
    return (j / 2) * 4 + ((byte >> ((j % 4) * 2)) & 3);
}

/* scalar: kept values [j0, k) of one row into acc[0..mb) */
static void row_tail(const packed_t *p, int64_t row, int64_t j0, const float *x, int64_t mb, float *acc) {
    for (int64_t j = j0; j < p->k_in / 2; j++) {
        float w = weight_at(p, row, j);
        int64_t c = column_at(p, row, j);
        for (int64_t m = 0; m < mb; m++) acc[m] += w * x[m * p->k_in + c];
    }
}

#ifdef __AVX512F__
/* block b's 16 kept weights without their scale: float values, or (code - zero) exactly (integers) */
static inline __m512 block_codes(const packed_t *p, int64_t row, int64_t b, int zero) {
    int64_t k = p->k_in / 2;
    if (p->kind == KIND_F32) return _mm512_loadu_ps((const float *)p->values + row * k + 16 * b);
    __m512i codes;
    if (p->kind == KIND_I8) {
        codes = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)p->values + row * k + 16 * b)));
    } else {
        __m128i raw = _mm_loadl_epi64((const __m128i *)((const uint8_t *)p->values + row * ((k + 1) / 2) + 8 * b));
        __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(15));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(15));
        codes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)); /* even j = low nibble first */
    }
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(codes, _mm512_set1_epi32(zero)));
}

/* in-group index of each of the 16 kept values of block b, as positions 0..31 of the block's inputs */
static inline __m512i block_columns(const packed_t *p, int64_t row, int64_t b) {
    uint32_t bits;
    memcpy(&bits, p->meta + row * ((p->k_in / 2 + 3) / 4) + 4 * b, 4);
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)bits), shifts), _mm512_set1_epi32(3));
    return _mm512_add_epi32(idx, base);
}

/* acc[m] += the whole 32-column blocks of one row for mb tokens (mb a constant after inlining): each
   quant group's sum of (code - zero) * x, then times the group's scale */
static inline __attribute__((always_inline)) void row_blocks(const packed_t *p, int64_t row, int64_t blocks,
                                                             const float *xm, const int mb, float *acc) {
    __m512 total[MB], part[MB];
    int64_t per = (p->kind == KIND_F32 || p->ngroups == 1) ? blocks : p->group_size / 32; /* blocks per group */
    for (int m = 0; m < mb; m++) total[m] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < blocks; b0 += per) {
        int64_t g = row * p->ngroups + (32 * b0) / p->group_size, b1 = b0 + per < blocks ? b0 + per : blocks;
        int zero = p->kind == KIND_I4 ? (p->zero ? p->zero[g] : 8) : 0;
        for (int m = 0; m < mb; m++) part[m] = _mm512_setzero_ps();
        for (int64_t b = b0; b < b1; b++) {
            __m512 w = block_codes(p, row, b, zero);
            __m512i cols = block_columns(p, row, b);
            for (int m = 0; m < mb; m++) {
                const float *xb = xm + m * p->k_in + 32 * b;
                __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(xb), cols, _mm512_loadu_ps(xb + 16));
                part[m] = _mm512_fmadd_ps(w, xs, part[m]);
            }
        }
        __m512 s = _mm512_set1_ps(p->kind == KIND_F32 ? 1.0f : p->scale[g]);
        for (int m = 0; m < mb; m++) total[m] = _mm512_fmadd_ps(part[m], s, total[m]);
    }
    for (int m = 0; m < mb; m++) acc[m] += _mm512_reduce_add_ps(total[m]);
}
#endif

static void one_row(const packed_t *p, int64_t row, const float *x, int64_t M, float *y, const float *bias) {
    int64_t K = p->k_in, blocks = 0;
#ifdef __AVX512F__
    /* vector blocks need whole 32-column blocks inside one quant group (or float values) */
    if (p->kind == KIND_F32 || p->ngroups == 1 || p->group_size % 32 == 0) blocks = K / 32;
#endif
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int64_t mb = M - m0 < MB ? M - m0 : MB;
        const float *xm = x + m0 * K;
        float acc[MB] = {0};
#ifdef __AVX512F__
        switch (mb) { /* constant token counts: the m loops unroll */
            case 1: row_blocks(p, row, blocks, xm, 1, acc); break;
            case 2: row_blocks(p, row, blocks, xm, 2, acc); break;
            case 3: row_blocks(p, row, blocks, xm, 3, acc); break;
            case 4: row_blocks(p, row, blocks, xm, 4, acc); break;
            case 5: row_blocks(p, row, blocks, xm, 5, acc); break;
            case 6: row_blocks(p, row, blocks, xm, 6, acc); break;
            case 7: row_blocks(p, row, blocks, xm, 7, acc); break;
            default: row_blocks(p, row, blocks, xm, MB, acc); break;
        }
#endif
        row_tail(p, row, 16 * blocks, xm, mb, acc);
        for (int64_t m = 0; m < mb; m++) y[(m0 + m) * p->n_rows + row] = acc[m] + (bias ? bias[row] : 0.0f);
    }
}

/* 1 when built with AVX-512: the scalar loop alone loses to a dense BLAS matvec, so the caller only uses
   this library when it is vectorized */
int nm24_vectorized(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* y (M, N) = x (M, K) @ W^T + bias (NULL: none); returns 0, or -1 for an unknown kind */
int nm24_linear(const float *x, int64_t M, int64_t K, const void *values, const uint8_t *meta, const float *scale,
                const uint8_t *zero, int64_t N, int64_t group_size, int64_t ngroups, int kind, const float *bias,
                float *y, int threads) {
    if (kind < KIND_F32 || kind > KIND_I4 || K % 4) return -1;
    packed_t p = {values, meta, scale, zero, N, K, group_size > 0 ? group_size : K, ngroups > 0 ? ngroups : 1, kind};
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < N; row++) one_row(&p, row, x, M, y, bias);
    return 0;
}

/* the dense (N, K) float32 weight, for large token counts (then a BLAS matmul); bit-exact with the
   reference's unpack: the same (code - zero) * scale per kept value, zeros elsewhere */
int nm24_unpack(const void *values, const uint8_t *meta, const float *scale, const uint8_t *zero, int64_t N,
                int64_t K, int64_t group_size, int64_t ngroups, int kind, float *out, int threads) {
    if (kind < KIND_F32 || kind > KIND_I4 || K % 4) return -1;
    packed_t p = {values, meta, scale, zero, N, K, group_size > 0 ? group_size : K, ngroups > 0 ? ngroups : 1, kind};
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < N; row++) {
        float *dst = out + row * K;
        int64_t blocks = 0;
        memset(dst, 0, (size_t)K * sizeof(float));
#ifdef __AVX512F__
        if (p.kind == KIND_F32 || p.ngroups == 1 || p.group_size % 32 == 0) blocks = K / 32;
        for (int64_t b = 0; b < blocks; b++) { /* 16 kept values scattered into their 32 columns */
            int64_t g = row * p.ngroups + (32 * b) / p.group_size;
            int z = p.kind == KIND_I4 ? (p.zero ? p.zero[g] : 8) : 0;
            __m512 w = block_codes(&p, row, b, z);
            if (p.kind != KIND_F32) w = _mm512_mul_ps(w, _mm512_set1_ps(p.scale[g]));
            _mm512_i32scatter_ps(dst + 32 * b, block_columns(&p, row, b), w, 4);
        }
#endif
        for (int64_t j = 16 * blocks; j < K / 2; j++) dst[column_at(&p, row, j)] = weight_at(&p, row, j);
    }
    return 0;
}
