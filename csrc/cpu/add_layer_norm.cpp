// Fused residual add + LayerNorm / RMSNorm on the CPU, forward and backward.
//
// Each row of N elements is read from memory once per direction. fp32 rows are used where they
// lie and fp32 outputs are computed in place; fp16/bf16 rows are converted through fp32 scratch
// rows that stay in L1. The statistics are fp32, and the row loops are vector code compiled for
// several ISAs with a runtime choice (simd.h). Outputs come from fastgpt's cache of buffers
// (output_cache.cpp), so a steady loop writes into pages that are already mapped. Rows are
// split over threads with at::parallel_for. The backward reduces dweight/dbias into one fp32
// partial row per fixed chunk of rows, then sums the chunks in order: the result does not
// depend on the thread count and uses no atomics.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "alloc_output.h"
#include "ops.h"
#include "simd.h"
#include "float_rows.h"

namespace fastgpt::cpu {
namespace {

// Fixed number of row chunks whose dweight/dbias partial sums the backward reduces in order.
constexpr int64_t kReductionChunks = 64;

bool is_supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastgpt native add_layer_norm (CPU): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), "fastgpt native add_layer_norm: ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_parameter(const std::optional<at::Tensor>& p, const char* name, int64_t n) {
  if (!p.has_value()) return;
  check_float_tensor(*p, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, "fastgpt native add_layer_norm: ", name, " must have shape (", n,
              ",) to match the last dimension, got ", p->sizes());
}

// t viewed as (rows, n) with unit inner stride; a copy only when the layout cannot be flattened.
at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor rows = t.reshape({-1, n});
  if (n > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

// A parameter as n contiguous fp32 values: the tensor's own memory when it is fp32 and contiguous
// (a model's usual weights: no copy per call), else a converted copy; null when absent.
class FloatParameter {
 public:
  explicit FloatParameter(const std::optional<at::Tensor>& p) {
    if (!p.has_value()) return;
    if (p->scalar_type() == at::kFloat && p->is_contiguous()) {
      values_ = p->const_data_ptr<float>();
      return;
    }
    const at::Tensor contiguous = p->contiguous();
    copy_.resize(contiguous.numel());
    load_row(contiguous.const_data_ptr(), contiguous.scalar_type(), 1, contiguous.numel(), copy_.data());
    values_ = copy_.data();
  }
  const float* values() const { return values_; }

 private:
  std::vector<float> copy_;
  const float* values_ = nullptr;
};

// h[i] = x[i] + residual[i]; returns sum(h)
FASTGPT_CPU_DISPATCH float add_and_sum(const float* x, const float* residual, int64_t n, float* h) {
  Floats sums{};
  for_lanes(n, [&](int64_t i, int64_t count) {
    const Floats sum = load_lanes(x + i, count) + load_lanes(residual + i, count);
    store_lanes(h + i, sum, count);
    sums += sum;
  });
  return sum_lanes(sums);
}

FASTGPT_CPU_DISPATCH float sum_of(const float* h, int64_t n) {
  Floats sums{};
  for_lanes(n, [&](int64_t i, int64_t count) { sums += load_lanes(h + i, count); });
  return sum_lanes(sums);
}

// sum((h - center)^2): a two-pass variance on the cached row, no cancellation of E[h^2] - E[h]^2
FASTGPT_CPU_DISPATCH float centered_sum_of_squares(const float* h, int64_t n, float center) {
  Floats sums{};
  for_lanes(n, [&](int64_t i, int64_t count) {
    const Floats d = load_lanes(h + i, count) - center;
    sums += first_lanes(d * d, count);
  });
  return sum_lanes(sums);
}

// y = (h - mean) * rstd [* weight] [+ bias]; weight/bias may be null
FASTGPT_CPU_DISPATCH void normalize(const float* h, int64_t n, float mean, float rstd, const float* weight,
                                    const float* bias, float* y) {
  for_lanes(n, [&](int64_t i, int64_t count) {
    Floats out = (load_lanes(h + i, count) - mean) * rstd;
    if (weight) out *= load_lanes(weight + i, count);
    if (bias) out += load_lanes(bias + i, count);
    store_lanes(y + i, out, count);
  });
}

// Lanes [i, i + count) of xhat = (h - mean) * rstd and g = dy * weight (weight may be null): both
// backward sweeps compute them the same way, so the second sees exactly the first's values.
__attribute__((always_inline)) inline void xhat_and_grad(const float* h, const float* dy, const float* weight,
                                                         int64_t i, int64_t count, float mean, float rstd,
                                                         Floats& xhat, Floats& dy_lanes, Floats& grad) {
  xhat = (load_lanes(h + i, count) - mean) * rstd;
  dy_lanes = load_lanes(dy + i, count);
  grad = weight ? dy_lanes * load_lanes(weight + i, count) : dy_lanes;
}

// The backward's first sweep of a row: with xhat = (h - mean) * rstd and g = dy * weight,
// dweight_acc += dy * xhat and dbias_acc += dy (each may be null); returns sum(g) and sum(g * xhat).
// xhat and g are not stored: the second sweep recomputes them from the rows still in L1, which is
// cheaper than two more stores per element (measured: the stores were this loop's bottleneck).
FASTGPT_CPU_DISPATCH void grad_row_sums(const float* h, const float* dy, const float* weight, int64_t n, float mean,
                                        float rstd, float* dweight_acc, float* dbias_acc, float* g_sum,
                                        float* g_xhat_sum) {
  Floats g_sums{}, g_xhat_sums{};
  for_lanes(n, [&](int64_t i, int64_t count) {
    Floats xhat, d, grad;
    xhat_and_grad(h, dy, weight, i, count, mean, rstd, xhat, d, grad);
    if (dweight_acc) store_lanes(dweight_acc + i, load_lanes(dweight_acc + i, count) + d * xhat, count);
    if (dbias_acc) store_lanes(dbias_acc + i, load_lanes(dbias_acc + i, count) + d, count);
    g_sums += grad;  // padding lanes of dy are 0, so they add nothing
    g_xhat_sums += grad * xhat;
  });
  *g_sum = sum_lanes(g_sums);
  *g_xhat_sum = sum_lanes(g_xhat_sums);
}

// dx = rstd * (g - g_mean - xhat * g_xhat_mean) [+ dh], xhat and g as in grad_row_sums; dh may be null
FASTGPT_CPU_DISPATCH void grad_input(const float* h, const float* dy, const float* weight, const float* dh, int64_t n,
                                     float mean, float rstd, float g_mean, float g_xhat_mean, float* dx) {
  for_lanes(n, [&](int64_t i, int64_t count) {
    Floats xhat, d, grad;
    xhat_and_grad(h, dy, weight, i, count, mean, rstd, xhat, d, grad);
    Floats out = (grad - g_mean - xhat * g_xhat_mean) * rstd;
    if (dh) out += load_lanes(dh + i, count);
    store_lanes(dx + i, out, count);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_forward(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms_norm, bool residual_in_fp32) {
  check_float_tensor(x, "x");
  check_float_tensor(residual, "residual");
  TORCH_CHECK(x.dim() >= 1 && x.numel() > 0, "fastgpt native add_layer_norm: x must be non-empty, got shape ",
              x.sizes());
  TORCH_CHECK(residual.sizes() == x.sizes(), "fastgpt native add_layer_norm: residual must have the shape of x ",
              x.sizes(), ", got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() || residual.scalar_type() == at::kFloat,
              "fastgpt native add_layer_norm: residual must have the dtype of x (", x.scalar_type(),
              ") or float32, got ", residual.scalar_type());
  const int64_t n = x.size(-1);
  check_parameter(weight, "weight", n);
  check_parameter(bias, "bias", n);
  TORCH_CHECK(eps > 0, "fastgpt native add_layer_norm: eps must be positive, got ", eps);

  const at::Tensor x_rows = as_rows(x, n);
  const at::Tensor residual_rows = as_rows(residual, n);
  const int64_t rows = x_rows.size(0);
  const at::ScalarType x_dtype = x.scalar_type();
  const at::ScalarType residual_dtype = residual.scalar_type();
  const at::ScalarType h_dtype = residual_in_fp32 ? at::kFloat : x_dtype;
  at::Tensor y = alloc_output(x.sizes(), x.options());
  at::Tensor h = alloc_output(x.sizes(), x.options().dtype(h_dtype));
  auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = alloc_output(stats_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = alloc_output(stats_shape, x.options().dtype(at::kFloat));
  const FloatParameter w(weight), b(bias);
  const float* w_values = w.values();
  const float* b_values = b.values();
  float* mean_out = mean.data_ptr<float>();
  float* rstd_out = rstd.data_ptr<float>();
  // fp32 rows are read and computed in place; scratch rows take the fp16/bf16 conversions
  const int64_t scratch_n = x_dtype == at::kFloat && residual_dtype == at::kFloat && h_dtype == at::kFloat ? 0 : n;

  const int64_t grain = std::max<int64_t>(1, 16384 / n);  // rows per task: enough work to amortize a task
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x_scratch(scratch_n), h_scratch(scratch_n), scratch(scratch_n);
    for (int64_t row = begin; row < end; ++row) {
      // h = x + residual, in fp32, then written once in h's dtype
      const float* x_row = fp32_row(element_ptr(x_rows, row * x_rows.stride(0)), x_dtype, n, x_scratch.data());
      const float* residual_row = fp32_row(element_ptr(residual_rows, row * residual_rows.stride(0)),
                                           residual_dtype, n, scratch.data());
      void* h_dst = mutable_element_ptr(h, row * n);
      float* h_row = fp32_output_row(h_dst, h_dtype, h_scratch.data());
      float h_sum = add_and_sum(x_row, residual_row, n, h_row);
      // normalize the h that is stored (rounded when fp16/bf16): the backward reads that h back,
      // and its xhat = (h - mean) * rstd must match the forward's even when rstd is huge
      if (h_dtype != at::kFloat) {
        round_row(h_row, n, h_dtype, scratch.data());
        h_sum = sum_of(h_row, n);
      }
      finish_output_row(h_row, n, h_dtype, h_dst);
      const float row_mean = is_rms_norm ? 0.f : h_sum / n;
      const float row_rstd =
          1.f / std::sqrt(centered_sum_of_squares(h_row, n, row_mean) / n + static_cast<float>(eps));
      mean_out[row] = row_mean;
      rstd_out[row] = row_rstd;
      void* y_dst = mutable_element_ptr(y, row * n);
      float* y_row = fp32_output_row(y_dst, x_dtype, scratch.data());
      normalize(h_row, n, row_mean, row_rstd, w_values, b_values, y_row);
      finish_output_row(y_row, n, x_dtype, y_dst);
    }
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, bool is_rms_norm) {
  check_float_tensor(h, "h");
  check_float_tensor(grad_y, "grad_y");
  TORCH_CHECK(h.dim() >= 1 && h.numel() > 0, "fastgpt native add_layer_norm_backward: h must be non-empty, got shape ",
              h.sizes());
  TORCH_CHECK(grad_y.sizes() == h.sizes(), "fastgpt native add_layer_norm_backward: grad_y must have the shape of h ",
              h.sizes(), ", got ", grad_y.sizes());
  if (grad_h.has_value()) {
    check_float_tensor(*grad_h, "grad_h");
    TORCH_CHECK(grad_h->sizes() == h.sizes(),
                "fastgpt native add_layer_norm_backward: grad_h must have the shape of h ", h.sizes(), ", got ",
                grad_h->sizes());
  }
  const int64_t n = h.size(-1);
  const int64_t rows = h.numel() / n;
  check_parameter(weight, "weight", n);
  check_parameter(bias, "bias", n);
  for (const auto& [stat, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
    TORCH_CHECK(stat.scalar_type() == at::kFloat && stat.numel() == rows && stat.device().is_cpu(),
                "fastgpt native add_layer_norm_backward: ", name, " must be a float32 CPU tensor with one value per row (",
                rows, "), got ", stat.scalar_type(), " of shape ", stat.sizes(), " on ", stat.device());
  }

  const at::Tensor h_rows = as_rows(h, n);
  const at::Tensor dy_rows = as_rows(grad_y, n);
  const at::Tensor dh_rows = grad_h.has_value() ? as_rows(*grad_h, n) : at::Tensor();
  const at::Tensor mean_values = mean.contiguous();
  const at::Tensor rstd_values = rstd.contiguous();
  const float* mean_in = mean_values.const_data_ptr<float>();
  const float* rstd_in = rstd_values.const_data_ptr<float>();
  at::Tensor dx = alloc_output(h.sizes(), h.options());
  const FloatParameter w(weight);
  const float* w_values = w.values();
  // fp32 rows are read and computed in place; scratch rows take the fp16/bf16 conversions
  const bool all_fp32 = h.scalar_type() == at::kFloat && grad_y.scalar_type() == at::kFloat &&
                        (!grad_h.has_value() || grad_h->scalar_type() == at::kFloat);
  const int64_t scratch_n = all_fp32 ? 0 : n;
  const bool want_dweight = weight.has_value(), want_dbias = bias.has_value();

  // one fp32 partial row per chunk of rows; chunks depend on the shape only, not on the threads
  const int64_t chunks = std::min(rows, kReductionChunks);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  std::vector<float> dweight_partial(want_dweight ? chunks * n : 0, 0.f);
  std::vector<float> dbias_partial(want_dbias ? chunks * n : 0, 0.f);

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> h_scratch(scratch_n), dy_scratch(scratch_n), dh_scratch(scratch_n), dx_scratch(scratch_n);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      float* dweight_acc = want_dweight ? &dweight_partial[chunk * n] : nullptr;
      float* dbias_acc = want_dbias ? &dbias_partial[chunk * n] : nullptr;
      const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
        const float* h_row = fp32_row(element_ptr(h_rows, row * h_rows.stride(0)), h.scalar_type(), n,
                                      h_scratch.data());
        const float* dy_row = fp32_row(element_ptr(dy_rows, row * dy_rows.stride(0)), grad_y.scalar_type(), n,
                                       dy_scratch.data());
        const float row_mean = mean_in[row], row_rstd = rstd_in[row];
        float g_sum, g_xhat_sum;
        grad_row_sums(h_row, dy_row, w_values, n, row_mean, row_rstd, dweight_acc, dbias_acc, &g_sum, &g_xhat_sum);
        const float* dh_row = grad_h.has_value() ? fp32_row(element_ptr(dh_rows, row * dh_rows.stride(0)),
                                                            grad_h->scalar_type(), n, dh_scratch.data())
                                                 : nullptr;
        void* dx_dst = mutable_element_ptr(dx, row * n);
        float* dx_row = fp32_output_row(dx_dst, h.scalar_type(), dx_scratch.data());
        // RMSNorm has no mean subtraction, hence no mean(g) term
        grad_input(h_row, dy_row, w_values, dh_row, n, row_mean, row_rstd, is_rms_norm ? 0.f : g_sum / n,
                   g_xhat_sum / n, dx_row);
        finish_output_row(dx_row, n, h.scalar_type(), dx_dst);
      }
    }
  });

  // sum the chunk partials in chunk order: deterministic
  auto reduce = [&](const std::vector<float>& partial, const at::Tensor& like) {
    std::vector<float> total(partial.begin(), partial.begin() + n);
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      for (int64_t i = 0; i < n; ++i) total[i] += partial[chunk * n + i];
    }
    at::Tensor out = alloc_output({n}, like.options());
    store_row(total.data(), n, like.scalar_type(), out.data_ptr());
    return out;
  };
  at::Tensor dweight = want_dweight ? reduce(dweight_partial, *weight) : at::empty({0}, h.options());
  at::Tensor dbias = want_dbias ? reduce(dbias_partial, *bias) : at::empty({0}, h.options());
  return {dx, dweight, dbias};
}

}  // namespace fastgpt::cpu
