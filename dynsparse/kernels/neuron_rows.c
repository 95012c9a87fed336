/* Single-token MLP over a subset of its hidden neurons, reading each kept neuron's weights in one pass.
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
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_SILU = 4 };

static float act(float v, int kind) {
  switch (kind) {
    case ACT_RELU: return v > 0.f ? v : 0.f;
    case ACT_GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case ACT_GELU_TANH: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case ACT_SILU: return v / (1.f + expf(-v));
    default: return v;
  }
}

static float dot(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#ifdef __AVX2__
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; j + 32 <= n; j += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(b + j + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(b + j + 24), a3);
  }
  float t[8];
  _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#endif
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

static void axpy(float h, const float* r, float* y, int64_t n) {
  int64_t j = 0;
#ifdef __AVX2__
  __m256 hv = _mm256_set1_ps(h);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(hv, _mm256_loadu_ps(r + j), _mm256_loadu_ps(y + j)));
#endif
  for (; j < n; ++j) y[j] += h * r[j];
}

/* y (c_out) = sum over the k kept neurons idx of h_i * w_out_i (y is overwritten). */
void ds_neuron_rows(const float* P, int64_t stride, const float* x, int64_t c_in, int64_t c_out,
                    const int64_t* idx, int64_t k, int has_g, int has_v, const float* g_pre, const float* b_g,
                    const float* b_v, int act_kind, float* y) {
  for (int64_t j = 0; j < c_out; ++j) y[j] = 0.f;
  const int64_t off_v = has_g ? c_in : 0, off_out = off_v + (has_v ? c_in : 0);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t n = idx[i];
    const float* row = P + n * stride;
    if (i + 1 < k) {  /* start the next neuron's stream early */
      const char* nxt = (const char*)(P + idx[i + 1] * stride);
      for (int p = 0; p < 256; p += 64) __builtin_prefetch(nxt + p, 0, 0);
    }
    float g = has_g ? act(dot(row, x, c_in) + (b_g ? b_g[n] : 0.f), act_kind) : g_pre[i];
    if (has_v) g *= dot(row + off_v, x, c_in) + (b_v ? b_v[n] : 0.f);
    axpy(g, row + off_out, y, c_out);
  }
}
