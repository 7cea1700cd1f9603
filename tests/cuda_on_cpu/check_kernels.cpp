// The CUDA add+LayerNorm backward and split-key decode (csrc/cuda), run on the CPU by cuda_on_cpu.h
// through their launchers, against float64 references computed here from the same inputs; each
// case runs twice with different thread orders and must give the same bits. Outputs start as NaN,
// so an element left unwritten fails. Prints one line per case and "N failures" last.
#define CUDA_ON_CPU_RUNTIME
#include "cuda_on_cpu.h"
#include "launchers.h"

using namespace fastgpt::cuda;

static int failures = 0;

template <typename T> float as_float(T v) { return float(v); }
template <> float as_float<__half>(__half v) { return __half2float(v); }
template <> float as_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from(float v) { return T(v); }
template <> __half from<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> constexpr DType dtype_of() {
  return std::is_same<T, float>::value ? DType::kFloat32 : std::is_same<T, __half>::value ? DType::kFloat16 : DType::kBFloat16;
}
template <typename T> T poison() { return from<T>(NAN); }

// ||got - want|| / ||want|| <= tolerance (NaN fails)
template <typename T>
void check_close(const char* what, const char* name, const std::vector<T>& got, const std::vector<double>& want,
                 double tolerance) {
  double error = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = as_float(got[i]);
    error += (g - want[i]) * (g - want[i]);
    norm += want[i] * want[i];
  }
  const double relative = std::sqrt(error) / std::max(std::sqrt(norm), 1e-30);
  if (!(relative <= tolerance)) {
    ++failures;
    std::printf("FAIL %s %s: relative error %.3g > %.3g\n", what, name, relative, tolerance);
  }
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0;
}

// ---------------------------------------------------------------- add + LayerNorm forward

// x in T, residual and h in R (T or fp32), fp32 parameters
template <typename T, typename R>
void check_add_layer_norm_forward(const char* what, int64_t rows, int64_t n, bool is_rms_norm) {
  std::mt19937 random(unsigned(rows * 17 + n));
  std::normal_distribution<float> normal;
  std::vector<T> x(rows * n);
  std::vector<R> residual(rows * n);
  std::vector<float> weight(n), bias(n);
  for (auto& v : x) v = from<T>(normal(random));
  for (auto& v : residual) v = from<R>(normal(random) + 0.5f);
  for (auto& v : weight) v = 1 + 0.3f * normal(random);
  for (auto& v : bias) v = 0.1f * normal(random);
  std::vector<T> y(rows * n, poison<T>());
  std::vector<R> h(rows * n, poison<R>());
  std::vector<float> mean(rows, NAN), rstd(rows, NAN);
  const float eps = 1e-5f;
  const cudaError_t err = add_layer_norm_forward(x.data(), dtype_of<T>(), n, residual.data(), dtype_of<R>(), n,
                                                 weight.data(), is_rms_norm ? nullptr : bias.data(), y.data(), h.data(),
                                                 dtype_of<R>(), mean.data(), rstd.data(), rows, n, eps, is_rms_norm,
                                                 nullptr);
  if (err != cudaSuccess) {
    ++failures;
    std::printf("FAIL %s: launcher returned %d\n", what, int(err));
    return;
  }
  std::vector<double> y_ref(rows * n), h_ref(rows * n), mean_ref(rows), rstd_ref(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0, squares = 0;
    for (int64_t c = 0; c < n; ++c) {
      h_ref[r * n + c] = double(as_float(x[r * n + c])) + as_float(residual[r * n + c]);
      sum += as_float(from<R>(float(h_ref[r * n + c])));  // statistics of h as stored
    }
    mean_ref[r] = is_rms_norm ? 0 : sum / n;
    for (int64_t c = 0; c < n; ++c) {
      const double centered = as_float(from<R>(float(h_ref[r * n + c]))) - mean_ref[r];
      squares += centered * centered;
    }
    rstd_ref[r] = 1 / std::sqrt(squares / n + eps);
    for (int64_t c = 0; c < n; ++c)
      y_ref[r * n + c] = (as_float(from<R>(float(h_ref[r * n + c]))) - mean_ref[r]) * rstd_ref[r] * weight[c] +
                         (is_rms_norm ? 0 : bias[c]);
  }
  const double tolerance = std::is_same<T, float>::value ? 1e-5 : 4e-3;
  check_close(what, "y", y, y_ref, tolerance);
  check_close(what, "h", h, h_ref, std::is_same<R, float>::value ? 1e-6 : 4e-3);
  check_close(what, "mean", mean, mean_ref, 1e-5);
  check_close(what, "rstd", rstd, rstd_ref, 1e-5);
  std::printf("add_layer_norm_forward %s: rows=%lld n=%lld ok so far (%d failures)\n", what, (long long)rows,
              (long long)n, failures);
}

// ---------------------------------------------------------------- add + LayerNorm backward

template <typename T, typename P>
void check_add_layer_norm_backward(const char* what, int64_t rows, int64_t n, bool is_rms_norm, bool with_dh,
                                   int multiprocessors, int64_t programs_override = 0) {
  std::mt19937 random(unsigned(rows * 131 + n));
  std::normal_distribution<float> normal;
  std::vector<T> h(rows * n), dy(rows * n), dh(with_dh ? rows * n : 0);
  std::vector<float> weight(n), mean(rows), rstd(rows);
  for (auto& x : h) x = from<T>(normal(random) * 2 + 0.5f);
  for (auto& x : dy) x = from<T>(normal(random));
  for (auto& x : dh) x = from<T>(normal(random));
  for (auto& x : weight) x = 1 + 0.3f * normal(random);
  for (int64_t r = 0; r < rows; ++r) {  // statistics of h as stored
    double sum = 0, squares = 0;
    for (int64_t c = 0; c < n; ++c) sum += as_float(h[r * n + c]);
    const double m = is_rms_norm ? 0 : sum / n;
    for (int64_t c = 0; c < n; ++c) squares += (as_float(h[r * n + c]) - m) * (as_float(h[r * n + c]) - m);
    mean[r] = float(m);
    rstd[r] = float(1 / std::sqrt(squares / n + 1e-5));
  }
  // float64 reference from the same inputs
  std::vector<double> dx_ref(rows * n), dweight_ref(n, 0.0), dbias_ref(n, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double mean_g = 0, mean_g_xhat = 0;
    for (int64_t c = 0; c < n; ++c) {
      const double xhat = (as_float(h[r * n + c]) - double(mean[r])) * rstd[r], g = as_float(dy[r * n + c]) * double(weight[c]);
      mean_g += g / n;
      mean_g_xhat += g * xhat / n;
    }
    for (int64_t c = 0; c < n; ++c) {
      const double xhat = (as_float(h[r * n + c]) - double(mean[r])) * rstd[r], g = as_float(dy[r * n + c]) * double(weight[c]);
      dx_ref[r * n + c] = rstd[r] * (g - (is_rms_norm ? 0 : mean_g) - xhat * mean_g_xhat) + (with_dh ? as_float(dh[r * n + c]) : 0);
      dweight_ref[c] += as_float(dy[r * n + c]) * xhat;
      dbias_ref[c] += as_float(dy[r * n + c]);
    }
  }
  cuda_on_cpu::multiprocessors = multiprocessors;
  const int64_t programs = programs_override > 0 ? programs_override : add_layer_norm_backward_programs(rows, n, multiprocessors);
  std::vector<T> dx_first;
  std::vector<P> dweight_first, dbias_first;
  for (unsigned seed : {1u, 2u}) {
    cuda_on_cpu::schedule_random.seed(seed);
    std::vector<T> dx(rows * n, poison<T>());
    std::vector<P> dweight(n, poison<P>()), dbias(n, poison<P>());
    std::vector<float> workspace(2 * programs * n, NAN);
    const cudaError_t err = add_layer_norm_backward(
        dy.data(), dtype_of<T>(), n, with_dh ? dh.data() : nullptr, n, h.data(), dtype_of<T>(), n, weight.data(),
        mean.data(), rstd.data(), dx.data(), dweight.data(), dtype_of<P>(), dbias.data(), dtype_of<P>(),
        workspace.data(), programs, rows, n, is_rms_norm, nullptr);
    if (err != cudaSuccess) {
      ++failures;
      std::printf("FAIL %s: launcher returned %d\n", what, int(err));
      return;
    }
    const double tolerance = std::is_same<T, float>::value ? 1e-5 : 4e-3;
    const double param_tolerance = std::is_same<P, float>::value ? 1e-5 : 4e-3;
    if (rows > 0) check_close(what, "dx", dx, dx_ref, tolerance);
    check_close(what, "dweight", dweight, dweight_ref, param_tolerance);
    check_close(what, "dbias", dbias, dbias_ref, param_tolerance);
    if (seed == 1) {
      dx_first = dx;
      dweight_first = dweight;
      dbias_first = dbias;
    } else if (!same_bits(dx, dx_first) || !same_bits(dweight, dweight_first) || !same_bits(dbias, dbias_first)) {
      ++failures;
      std::printf("FAIL %s: the bits depend on the order threads run in\n", what);
    }
  }
  std::printf("add_layer_norm_backward %s: rows=%lld n=%lld programs=%lld ok so far (%d failures)\n", what,
              (long long)rows, (long long)n, (long long)programs, failures);
}

// ---------------------------------------------------------------- decode

template <typename T>
void check_decode(const char* what, int64_t batch, int64_t heads, int64_t kv_heads, int64_t seq_q, int64_t seq_k,
                  int64_t d, bool causal, bool vector_layout, int multiprocessors) {
  std::mt19937 random(unsigned(heads * 1000 + seq_k * 7 + d));
  std::normal_distribution<float> normal;
  // q contiguous; k, v as (batch, seq_k, kv_heads, width) buffers viewed as (batch, kv_heads, seq_k, d):
  // width d keeps every row 16-byte aligned (16-byte loads), d + 3 does not (element loads)
  const int64_t width = vector_layout ? d : d + 3;
  std::vector<T> q(batch * heads * seq_q * d), k(batch * seq_k * kv_heads * width), v(k.size());
  for (auto& x : q) x = from<T>(normal(random));
  for (auto& x : k) x = from<T>(normal(random));
  for (auto& x : v) x = from<T>(normal(random));
  const Strides4 q_strides{heads * seq_q * d, seq_q * d, d, 1};
  const Strides4 kv_strides{seq_k * kv_heads * width, width, kv_heads * width, 1};
  const float scale = 1.0f / std::sqrt(float(d));
  const AttentionShape shape{batch, heads, kv_heads, seq_q, seq_k, d};
  // float64 reference
  std::vector<double> o_ref(batch * heads * seq_q * d, 0.0), lse_ref(batch * heads * seq_q);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t hd = 0; hd < heads; ++hd)
      for (int64_t i = 0; i < seq_q; ++i) {
        const int64_t kvh = hd / (heads / kv_heads), row = (b * heads + hd) * seq_q + i;
        const int64_t end = causal ? std::min(seq_k, i + seq_k - seq_q + 1) : seq_k;
        std::vector<double> s(std::max<int64_t>(end, 0));
        double m = -INFINITY;
        for (int64_t j = 0; j < end; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < d; ++c)
            dot += double(as_float(q[row * d + c])) * as_float(k[b * kv_strides.batch + kvh * kv_strides.head + j * kv_strides.seq + c]);
          s[j] = dot * scale;
          m = std::max(m, s[j]);
        }
        if (end <= 0) {
          lse_ref[row] = -INFINITY;
          continue;
        }
        double total = 0;
        for (int64_t j = 0; j < end; ++j) total += std::exp(s[j] - m);
        lse_ref[row] = m + std::log(total);
        for (int64_t j = 0; j < end; ++j)
          for (int64_t c = 0; c < d; ++c)
            o_ref[row * d + c] += std::exp(s[j] - m) / total *
                                  as_float(v[b * kv_strides.batch + kvh * kv_strides.head + j * kv_strides.seq + c]);
      }
  cuda_on_cpu::multiprocessors = multiprocessors;
  std::vector<T> o_first;
  for (unsigned seed : {1u, 2u}) {
    cuda_on_cpu::schedule_random.seed(seed);
    std::vector<T> o(o_ref.size(), poison<T>());
    std::vector<float> lse(lse_ref.size(), NAN), workspace(attention_decode_workspace_floats(shape), NAN);
    const cudaError_t err = attention_decode_forward(q.data(), q_strides, k.data(), kv_strides, v.data(), kv_strides,
                                                     dtype_of<T>(), o.data(), lse.data(), workspace.data(), shape,
                                                     causal, scale, nullptr);
    if (err != cudaSuccess) {
      ++failures;
      std::printf("FAIL %s: launcher returned %d\n", what, int(err));
      return;
    }
    check_close(what, "o", o, o_ref, 4e-3);
    for (size_t r = 0; r < lse.size(); ++r) {
      const bool ok = std::isinf(lse_ref[r]) ? (std::isinf(lse[r]) && lse[r] < 0) : std::fabs(lse[r] - lse_ref[r]) <= 1e-4 * (1 + std::fabs(lse_ref[r]));
      if (!ok) {
        ++failures;
        std::printf("FAIL %s: lse[%zu] = %.7g, want %.7g\n", what, r, lse[r], lse_ref[r]);
        break;
      }
    }
    if (seed == 1) o_first = o;
    else if (!same_bits(o, o_first)) {
      ++failures;
      std::printf("FAIL %s: the bits depend on the order threads run in\n", what);
    }
  }
  const int64_t group_rows = heads / kv_heads * seq_q;
  std::printf("decode %s: %lld kv heads x %lld rows, seq_k=%lld d=%lld ok so far (%d failures)\n", what,
              (long long)kv_heads, (long long)group_rows, (long long)seq_k, (long long)d, failures);
}

int main() {
  // add + LayerNorm forward: warp rows and block rows (one row of T threads per block)
  check_add_layer_norm_forward<__half, float>("fp16 n=768 fp32 residual", 9, 768, false);
  check_add_layer_norm_forward<float, float>("fp32 n=100", 7, 100, false);
  check_add_layer_norm_forward<__nv_bfloat16, __nv_bfloat16>("bf16 n=3000 rms", 5, 3000, true);
  // add + LayerNorm backward: warp rows (K = 1, 2, 4), multi-warp rows (T = 64, 96), ragged sizes
  check_add_layer_norm_backward<float, float>("fp32 n=100 dh", 37, 100, false, true, 2);
  check_add_layer_norm_backward<__half, float>("fp16 n=768 rms", 50, 768, true, false, 2);
  check_add_layer_norm_backward<__nv_bfloat16, __nv_bfloat16>("bf16 n=512 bf16 params", 70, 512, false, false, 1);
  check_add_layer_norm_backward<float, __half>("fp32 n=1100 fp16 params", 20, 1100, false, true, 2);
  check_add_layer_norm_backward<__half, float>("fp16 n=3000", 11, 3000, false, false, 1);
  check_add_layer_norm_backward<float, float>("fp32 n=64 more programs than rows", 5, 64, false, false, 1, 7);
  check_add_layer_norm_backward<float, float>("fp32 no rows", 0, 40, false, false, 2);
  // decode: R = 1, 4, 8 rows per block, two tiles with padding rows, head dims 32-128, both load paths
  check_decode<__half>("mha", 1, 2, 2, 1, 130, 64, true, true, 2);
  check_decode<__half>("gqa 4", 2, 8, 2, 1, 77, 64, true, true, 2);
  check_decode<__nv_bfloat16>("gqa 8", 1, 16, 2, 1, 150, 128, false, true, 2);
  check_decode<__half>("gqa 4 x 3 queries", 1, 8, 2, 3, 100, 128, true, false, 1);
  check_decode<__nv_bfloat16>("more queries than keys", 1, 6, 2, 2, 1, 32, true, true, 1);
  check_decode<__half>("d 96", 1, 3, 1, 4, 45, 96, false, false, 1);
  check_decode<__half>("d 96 vector", 1, 4, 2, 2, 300, 96, true, true, 4);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
