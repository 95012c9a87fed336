/* A conv weight's kept filters (rows) and kept input channels (columns) copied in one pass, each kept filter
 * scaled by its BatchNorm factor on the way (per-input channel gating, dynsparse.layers.channel_kernels).
 *
 * PyTorch needs up to three passes for this (index_select of rows, index_select of columns, a multiply), and
 * index_select along the innermost dimension moves one float at a time. Here the innermost dimension is packed
 * eight floats at a time: a byte mask per eight channels picks a permutation from a 256-entry table, one
 * permute moves the kept floats of the chunk to its front, and the (unaligned) store advances by their count
 * (the AVX2 "left-pack"). The stray floats a full store leaves past the end are overwritten by the next chunk,
 * and the last stores of the output are done one float at a time so nothing is written past its end.
 *
 * Layouts: "last" (the weight stored (O, K, I): channels-last OHWI, or any (O, I) matrix with K = 1) gathers
 * along the innermost dimension with the left-pack; "first" (stored (O, I, K): contiguous OIHW, K = kh * kw > 1)
 * copies K contiguous floats per kept column. The output is stored the same way as the input, kept rows and
 * columns only, in the order given. Columns must be strictly increasing (the left-pack keeps source order) and
 * in range; rows may be in any order but must be in range. scale holds one factor per filter of w (O values): kept
 * filter r is multiplied by scale[rows[r]]; NULL: none, the values are copied bit for bit. Returns 0, or -1
 * (nothing trustworthy written) when an index is out of range or the columns are not strictly increasing.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static int32_t PERM[256][8];
static uint8_t COUNT[256];

__attribute__((constructor)) static void init_tables(void) {
  for (int m = 0; m < 256; ++m) {
    int n = 0;
    for (int b = 0; b < 8; ++b)
      if (m >> b & 1) PERM[m][n++] = b;
    COUNT[m] = (uint8_t)n;
    for (int b = n; b < 8; ++b) PERM[m][b] = 0;
  }
}

/* the kept columns of one row src (I floats), times s where scaled (else copied bit for bit: a multiply by 1 would
 * flush denormals under FTZ/DAZ and quiet a signalling NaN), packed into dst; returns the end of what was written */
static inline float* pack_row(const float* src, int64_t I, const uint8_t* mask, const int64_t* cols, int64_t nc,
                              float s, int scaled, float* dst, const float* end) {
#ifdef __AVX2__
  const __m256 vs = _mm256_set1_ps(s);
  const int64_t chunks = I / 8;
  for (int64_t j = 0; j < chunks; ++j) {
    const unsigned m = mask[j];
    if (!m) continue;
    __m256 v = _mm256_loadu_ps(src + 8 * j);
    if (scaled) v = _mm256_mul_ps(v, vs);
    const __m256 p = _mm256_permutevar8x32_ps(v, _mm256_loadu_si256((const __m256i*)PERM[m]));
    if (dst + 8 <= end) {
      _mm256_storeu_ps(dst, p);
    } else {
      float tmp[8];
      _mm256_storeu_ps(tmp, p);
      for (unsigned u = 0; u < COUNT[m]; ++u) dst[u] = tmp[u];
    }
    dst += COUNT[m];
  }
  for (int64_t c = chunks * 8; c < I; ++c)
    if (mask[c >> 3] >> (c & 7) & 1) *dst++ = scaled ? src[c] * s : src[c];
  (void)cols;
  (void)nc;
#else
  (void)mask;
  (void)I;
  (void)end;
  for (int64_t c = 0; c < nc; ++c) dst[c] = scaled ? src[cols[c]] * s : src[cols[c]];
  dst += nc;
#endif
  return dst;
}

/* k floats from p times s where scaled, else copied bit for bit (as pack_row) */
static inline void copy_run(float* dst, const float* p, int64_t k, float s, int scaled) {
  int64_t j = 0;
#ifdef __AVX2__
  const __m256 vs = _mm256_set1_ps(s);
  for (; j + 8 <= k; j += 8) {
    const __m256 v = _mm256_loadu_ps(p + j);
    _mm256_storeu_ps(dst + j, scaled ? _mm256_mul_ps(v, vs) : v);
  }
#endif
  for (; j < k; ++j) dst[j] = scaled ? p[j] * s : p[j];
}

int ds_conv_gather(const float* w, int64_t O, int64_t K, int64_t I, int last, const int64_t* rows, int64_t nr,
                   const int64_t* cols, int64_t nc, const float* scale, float* out) {
  if (rows)
    for (int64_t r = 0; r < nr; ++r)
      if (rows[r] < 0 || rows[r] >= O) return -1;
  if (cols)
    for (int64_t c = 0; c < nc; ++c)
      if (cols[c] < 0 || cols[c] >= I || (c > 0 && cols[c] <= cols[c - 1])) return -1;
  const int64_t n_out = nr * K * nc;
  const float* end = out + n_out;
  if (!cols) { /* whole rows: a scaled copy */
    for (int64_t r = 0; r < nr; ++r) {
      const float* src = w + (rows ? rows[r] : r) * K * I;
      float* dst = out + r * K * I;
      const float s = scale ? scale[rows ? rows[r] : r] : 1.f;
      if (!scale) {
        memcpy(dst, src, (size_t)(K * I) * sizeof(float));
      } else {
        for (int64_t j = 0; j < K * I; ++j) dst[j] = src[j] * s;
      }
    }
    return 0;
  }
  if (last) {
    uint8_t* mask = calloc((size_t)(I / 8 + 1), 1);
    if (!mask) return -1;
    for (int64_t c = 0; c < nc; ++c) mask[cols[c] >> 3] |= (uint8_t)(1u << (cols[c] & 7));
    float* dst = out;
    for (int64_t r = 0; r < nr; ++r) {
      const float* src = w + (rows ? rows[r] : r) * K * I;
      if (scale) { /* two calls: each inlined with scaled a constant (a branch per chunk was measured slower) */
        const float s = scale[rows ? rows[r] : r];
        for (int64_t k = 0; k < K; ++k) dst = pack_row(src + k * I, I, mask, cols, nc, s, 1, dst, end);
      } else {
        for (int64_t k = 0; k < K; ++k) dst = pack_row(src + k * I, I, mask, cols, nc, 1.f, 0, dst, end);
      }
    }
    free(mask);
    return 0;
  }
  for (int64_t r = 0; r < nr; ++r) { /* "first": K contiguous floats per kept column */
    const float* src = w + (rows ? rows[r] : r) * K * I;
    const float s = scale ? scale[rows ? rows[r] : r] : 1.f;
    float* dst = out + r * nc * K;
    /* 3x3: a fixed-size run the compiler unrolls (a loop over a variable K was slower than torch), scaled or not */
    if (K == 9 && scale) {
      for (int64_t c = 0; c < nc; ++c, dst += 9) copy_run(dst, src + cols[c] * 9, 9, s, 1);
    } else if (K == 9) {
      for (int64_t c = 0; c < nc; ++c, dst += 9) copy_run(dst, src + cols[c] * 9, 9, s, 0);
    } else {
      for (int64_t c = 0; c < nc; ++c, dst += K) copy_run(dst, src + cols[c] * K, K, s, scale != NULL);
    }
  }
  return 0;
}
