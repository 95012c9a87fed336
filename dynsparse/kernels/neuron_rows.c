/* Single-token MLP over a subset of its hidden neurons, reading each kept neuron's weights in one pass.
 * (ds_neuron_rows: the kept neurons are given; ds_cats_rows: they are chosen here by a CATS threshold.)
 *
 * Packed layout (built once per module by dynsparse.kernels.pack_neurons): row i of P holds neuron i's data,
 * in this order and only the parts present:
 *     [ w_g (c_in) | w_v (c_in) | w_out (c_out) ]
 * where h_i = act(w_g . x + b_g[i]) * (w_v . x + b_v[i]) and y = sum_i h_i w_out. With g_pre (the activated
 * gate values already known, e.g. thresholded by CATS) the w_g part is absent and g_pre[j] is used for the
 * j-th kept neuron. One contiguous stream per neuron is what lets the hardware prefetcher keep up: a gathered
 * copy reads the kept rows twice and writes them once, and separate scattered rows of w_g, w_v and w_out
 * break the stream at every 4 KB.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_SILU = 4 };

static float act(float v, int kind) {
  switch (kind) {
    case ACT_RELU: return v < 0.f ? 0.f : v; /* NaN stays NaN, as torch.relu */
    case ACT_GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case ACT_GELU_TANH: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case ACT_SILU: return v / (1.f + expf(-v));
    default: return v;
  }
}

/* Up to NB neurons at a time: NB independent streams keep more memory requests in flight than one (measured on
 * the 2-core EPYC, half of a 1024 -> 4096 -> 1024 MLP: 1.70x over dense one neuron at a time, 2.0x in pairs,
 * 2.6x in fours). m is a compile-time constant where this is inlined with m = NB. */
#define NB 4

static inline void dots(const float* const* rows, int m, const float* x, int64_t n, float* out) {
  int64_t j = 0;
  for (int u = 0; u < m; ++u) out[u] = 0.f;
#ifdef __AVX2__
  __m256 acc[NB];
  for (int u = 0; u < m; ++u) acc[u] = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    __m256 xv = _mm256_loadu_ps(x + j);
    for (int u = 0; u < m; ++u) acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[u] + j), xv, acc[u]);
  }
  for (int u = 0; u < m; ++u) {
    float t[8];
    _mm256_storeu_ps(t, acc[u]);
    out[u] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
#endif
  for (; j < n; ++j)
    for (int u = 0; u < m; ++u) out[u] += rows[u][j] * x[j];
}

static inline void axpys(const float* h, const float* const* rows, int m, float* y, int64_t n) {
  int64_t j = 0;
#ifdef __AVX2__
  __m256 hv[NB];
  for (int u = 0; u < m; ++u) hv[u] = _mm256_set1_ps(h[u]);
  for (; j + 8 <= n; j += 8) {
    __m256 acc = _mm256_loadu_ps(y + j);
    for (int u = 0; u < m; ++u) acc = _mm256_fmadd_ps(hv[u], _mm256_loadu_ps(rows[u] + j), acc);
    _mm256_storeu_ps(y + j, acc);
  }
#endif
  for (; j < n; ++j)
    for (int u = 0; u < m; ++u) y[j] += h[u] * rows[u][j];
}

static inline void block(const float* P, int64_t stride, const float* x, int64_t c_in, int64_t c_out,
                         const int64_t* idx, int64_t i0, int m, int has_g, int has_v, const float* g_pre,
                         const float* b_g, const float* b_v, int act_kind, float* y) {
  const int64_t off_v = has_g ? c_in : 0, off_out = off_v + (has_v ? c_in : 0);
  const float* rows[NB];
  float g[NB], v[NB];
  for (int u = 0; u < m; ++u) rows[u] = P + idx[i0 + u] * stride;
  if (has_g) {
    dots(rows, m, x, c_in, g);
    for (int u = 0; u < m; ++u) g[u] = act(g[u] + (b_g ? b_g[idx[i0 + u]] : 0.f), act_kind);
  } else {
    for (int u = 0; u < m; ++u) g[u] = g_pre[i0 + u];
  }
  if (has_v) {
    const float* vr[NB];
    for (int u = 0; u < m; ++u) vr[u] = rows[u] + off_v;
    dots(vr, m, x, c_in, v);
    for (int u = 0; u < m; ++u) g[u] *= v[u] + (b_v ? b_v[idx[i0 + u]] : 0.f);
  }
  const float* out[NB];
  for (int u = 0; u < m; ++u) out[u] = rows[u] + off_out;
  axpys(g, out, m, y, c_out);
}

/* y (c_out) = sum over the k kept neurons idx of h_i * w_out_i (y is overwritten). */
void ds_neuron_rows(const float* P, int64_t stride, const float* x, int64_t c_in, int64_t c_out,
                    const int64_t* idx, int64_t k, int has_g, int has_v, const float* g_pre, const float* b_g,
                    const float* b_v, int act_kind, float* y) {
  for (int64_t j = 0; j < c_out; ++j) y[j] = 0.f;
  int64_t i = 0;
  for (; i + NB <= k; i += NB)
    block(P, stride, x, c_in, c_out, idx, i, NB, has_g, has_v, g_pre, b_g, b_v, act_kind, y);
  if (i < k) block(P, stride, x, c_in, c_out, idx, i, (int)(k - i), has_g, has_v, g_pre, b_g, b_v, act_kind, y);
}

/* CATS on one token: g_i = act(w_g[i] . x + b_g[i]) for every neuron (NB rows at a time), kept where
 * |g_i| >= t (every neuron when t = -inf), then y = sum over kept i of g_i (w_v[i] . x + b_v[i]) w_out_i from
 * the packed rows P (parts [w_v | w_out], or [w_out] without has_v). W_g is (H, c_in) with row stride
 * wg_stride. The kept neurons (ascending) and their activated gate values go to idx and g (both of length >= H);
 * returns their number. */
int64_t ds_cats_rows(const float* W_g, int64_t wg_stride, const float* b_g, const float* x, int64_t c_in,
                     int64_t H, float t, int act_kind, const float* P, int64_t stride, int has_v,
                     const float* b_v, int64_t c_out, int64_t* idx, float* g, float* y) {
  int64_t k = 0;
  const int keep_all = isinf(t) && t < 0;  /* keep = 1: every neuron, NaN activations too */
  const float* rows[NB];
  float d[NB];
  for (int64_t i = 0; i < H; i += NB) {
    const int m = H - i < NB ? (int)(H - i) : NB;
    for (int u = 0; u < m; ++u) rows[u] = W_g + (i + u) * wg_stride;
    dots(rows, m, x, c_in, d);
    for (int u = 0; u < m; ++u) {
      const float v = act(d[u] + (b_g ? b_g[i + u] : 0.f), act_kind);
      if (keep_all || fabsf(v) >= t) {
        idx[k] = i + u;
        g[k++] = v;
      }
    }
  }
  for (int64_t j = 0; j < c_out; ++j) y[j] = 0.f;
  int64_t i = 0;
  for (; i + NB <= k; i += NB) block(P, stride, x, c_in, c_out, idx, i, NB, 0, has_v, g, NULL, b_v, 0, y);
  if (i < k) block(P, stride, x, c_in, c_out, idx, i, (int)(k - i), 0, has_v, g, NULL, b_v, 0, y);
  return k;
}
