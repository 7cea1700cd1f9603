// Pieces both CPU attention kernels use (the tiled forward and backward in attention.cpp, the decode
// kernel in attention_decode.cpp): the vector exp/max/scale row loops of the online softmax, tiles of
// q/k/v read in place or converted, and the dynamic task loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "float_rows.h"
#include "gemm.h"
#include "simd.h"

namespace fastgpt::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ----------------------------------------------------------------------------- exp kernels

// exp(x) to ~1 ulp over the range softmax needs (Cephes' expf: 2^n times a degree-6 polynomial).
// always inlined, so each ISA clone below gets its own copy
__attribute__((always_inline)) inline Floats exp_lanes(Floats x) {
  x = x < -87.3f ? Floats{} - 87.3f : x;
  x = x > 88.3f ? Floats{} + 88.3f : x;
  const Floats round_magic = Floats{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const Floats n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const Floats r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Floats p = Floats{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  const Ints two_to_n = (__builtin_convertvector(n, Ints) + 127) << 23;
  return p * (Floats)two_to_n;  // a vector cast reinterprets the bits
}

// row[j] = exp(row[j] * multiplier - shift) for j < n; returns the sum of the new values.
FASTGPT_CPU_DISPATCH inline float exp_in_place(float* row, int64_t n, float multiplier, float shift) {
  Floats sums{};
  // always_inline: GCC left this lambda out of line, as baseline code, for the partial lane group
  // that most causal rows end with (5% of a bf16 causal forward)
  for_lanes(n, [&](int64_t j, int64_t count) __attribute__((always_inline)) {
    const Floats x = exp_lanes(load_lanes(row + j, count) * multiplier - shift);
    store_lanes(row + j, x, count);
    sums += count == kLanes ? x : load_lanes(row + j, count);  // padding lanes do not count
  });
  return sum_lanes(sums);
}

// out[j] = exp(row[j] - shift) rounded to bf16 for j < n: the probabilities of a row straight into
// the operand of their product, one pass; returns the sum of the unrounded values. Only called where
// gemm_bf16_pairs runs (AVX512-BF16), so it is written for that: exp(y) = 2^t, t = y log2(e), as
// 2^round(t) (VSCALEFPS: no clamping of the exponent, -inf gives 0) times 2^f, |f| <= 1/2, from
// its Taylor polynomial of degree 5 (relative error < 3e-6, a thousandth of bf16's rounding), and
// VCVTNEPS2BF16 rounds to nearest even. About half the instructions of exp_lanes + store_bf16_lanes.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f,avx512vl,avx512bw,avx512bf16"))) inline float exp_to_bf16(const float* row, int64_t n,
                                                                                        float shift,
                                                                                        c10::BFloat16* out) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), lowest = _mm512_set1_ps(-200.f);
  const __m512 shifts = _mm512_set1_ps(shift);
  // 2^f = e^(f ln 2): Taylor coefficients (ln 2)^k / k!
  const __m512 c1 = _mm512_set1_ps(0.693147180559945f), c2 = _mm512_set1_ps(0.240226506959101f),
               c3 = _mm512_set1_ps(0.0555041086648216f), c4 = _mm512_set1_ps(0.00961812910762848f),
               c5 = _mm512_set1_ps(0.00133335581464284f), one = _mm512_set1_ps(1.f);
  __m512 sums = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    // max(lowest, t) keeps a NaN t (MAXPS returns its second operand where one is NaN)
    const __m512 t = _mm512_max_ps(lowest, _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + j), shifts), log2e));
    const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, whole);
    __m512 p = _mm512_fmadd_ps(c5, f, c4);
    p = _mm512_fmadd_ps(p, f, c3);
    p = _mm512_fmadd_ps(p, f, c2);
    p = _mm512_fmadd_ps(p, f, c1);
    p = _mm512_fmadd_ps(p, f, one);
    const __m512 x = _mm512_scalef_ps(p, whole);
    sums = _mm512_mask_add_ps(sums, lanes, sums, x);
    _mm256_mask_storeu_epi16(out + j, lanes, (__m256i)_mm512_cvtneps_pbh(x));
  }
  return _mm512_reduce_add_ps(sums);
}
#else
FASTGPT_CPU_DISPATCH inline float exp_to_bf16(const float* row, int64_t n, float shift, c10::BFloat16* out) {
  Floats sums{};
  for_lanes(n, [&](int64_t j, int64_t count) __attribute__((always_inline)) {
    const Floats x = exp_lanes(load_lanes(row + j, count) - shift);
    store_bf16_lanes(out + j, x, count);
    sums += count == kLanes ? x : first_lanes(x, count);  // padding lanes do not count
  });
  return sum_lanes(sums);
}
#endif

FASTGPT_CPU_DISPATCH inline float max_of(const float* row, int64_t n) {
  Floats best = Floats{} + kNegInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Floats x = load_lanes(row + j);
    best = x > best ? x : best;
  }
  float total = kNegInf;
  for (int lane = 0; lane < kLanes; ++lane) total = std::max(total, best[lane]);
  for (; j < n; ++j) total = std::max(total, row[j]);
  return total;
}

// row[j] *= factor for j < n
FASTGPT_CPU_DISPATCH inline void scale_in_place(float* row, int64_t n, float factor) {
  for_lanes(n, [&](int64_t j, int64_t count) { store_lanes(row + j, load_lanes(row + j, count) * factor, count); });
}

// row[j] = cap * tanh(row[j] * multiplier / cap) for j < n (soft-capping, scale first); where
// derivative is given, derivative[j] = 1 - tanh^2, the cap's derivative the backward multiplies by.
// tanh(y) = 1 - 2 / (exp(2y) + 1): exp_lanes saturates, so large |y| give exactly +-1, and the
// absolute error near 0 is an ulp of 1 (the scores' own rounding is larger).
FASTGPT_CPU_DISPATCH inline void softcap_in_place(float* row, int64_t n, float multiplier, float cap,
                                                  float* derivative) {
  const float inner = 2.f * multiplier / cap;
  const Floats one = Floats{} + 1.f;
  for_lanes(n, [&](int64_t j, int64_t count) __attribute__((always_inline)) {
    const Floats t = one - (one + one) / (exp_lanes(load_lanes(row + j, count) * inner) + one);
    store_lanes(row + j, t * cap, count);
    if (derivative != nullptr) store_lanes(derivative + j, one - t * t, count);
  });
}

// ----------------------------------------------------------------------------- tiles

// Values computed in fp32 (probabilities, score gradients: rows x cols, row stride ld) as an operand
// of the next product: the values themselves for fp32 products, else rounded into buffer + offset.
inline const float* as_operand(const float* values, int64_t, int64_t, int64_t, float*, int64_t) { return values; }

inline const c10::BFloat16* as_operand(const float* values, int64_t rows, int64_t cols, int64_t ld,
                                       c10::BFloat16* buffer, int64_t offset) {
  for (int64_t r = 0; r < rows; ++r) round_to_bf16(values + r * ld, cols, buffer + offset + r * ld);
  return buffer + offset;
}

// Scratch for as_operand(): none where the products run in fp32.
template <typename Elem>
std::vector<Elem> operand_buffer(int64_t size) {
  return std::vector<Elem>(std::is_same_v<Elem, float> ? 0 : size);
}

// Rows of a tile's elements (fp32, or bf16 where the products run in bf16), row r at data + r * ld.
template <typename Elem>
struct Tile {
  const Elem* data;
  int64_t ld;
  const Elem* row(int64_t r) const { return data + r * ld; }
};

// A (batch, heads, seq, head_dim) tensor read row by row, with its own strides and dtype.
struct Heads {
  const char* data;
  int64_t element_size;
  at::ScalarType dtype;
  int64_t stride_batch, stride_head, stride_seq, stride_dim;

  explicit Heads(const at::Tensor& t)
      : data(static_cast<const char*>(t.const_data_ptr())),
        element_size(t.element_size()),
        dtype(t.scalar_type()),
        stride_batch(t.stride(0)),
        stride_head(t.stride(1)),
        stride_seq(t.stride(2)),
        stride_dim(t.stride(3)) {}

  // rows [first, first + count) of head (b, h) into a dense fp32 tile: count x head_dim
  void load(int64_t b, int64_t h, int64_t first, int64_t count, int64_t head_dim, float* tile) const {
    for (int64_t r = 0; r < count; ++r) {
      load_row(row(b, h, first + r), dtype, stride_dim, head_dim, tile + r * head_dim);
    }
  }

  // The same rows as a matrix of Elem (count x head_dim, row stride ld): the tensor itself when it
  // holds Elem with a unit inner stride (no copy), else converted into `buffer`.
  template <typename Elem>
  Tile<Elem> tile(int64_t b, int64_t h, int64_t first, int64_t count, int64_t head_dim, Elem* buffer) const {
    if (dtype == c10::CppTypeToScalarType<Elem>::value && (stride_dim == 1 || head_dim == 1) &&
        stride_seq >= head_dim) {
      return {reinterpret_cast<const Elem*>(row(b, h, first)), count == 1 ? head_dim : stride_seq};
    }
    if constexpr (std::is_same_v<Elem, float>) {
      load(b, h, first, count, head_dim, buffer);
    } else {  // bf16 tiles are only used for bf16 tensors: this is a strided copy
      for (int64_t r = 0; r < count; ++r) {
        const Elem* src = reinterpret_cast<const Elem*>(row(b, h, first + r));
        for (int64_t c = 0; c < head_dim; ++c) buffer[r * head_dim + c] = src[c * stride_dim];
      }
    }
    return {buffer, head_dim};
  }

  // address of row s of head (b, h): its elements are stride_dim elements apart
  const char* row(int64_t b, int64_t h, int64_t s) const {
    return data + (b * stride_batch + h * stride_head + s * stride_seq) * element_size;
  }
};

// Calls worker(next_task) once per thread; next_task() hands out 0, 1, 2, ... first come, first
// served, so a thread slowed down by other load on the machine simply takes fewer tasks. Every
// task writes its own outputs whatever thread runs it: the results stay deterministic.
template <typename Worker>
void run_tasks_dynamically(int64_t tasks, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  auto next_task = [&counter]() { return counter.fetch_add(1, std::memory_order_relaxed); };
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) { worker(next_task); });
}

// Number of keys of a key block [first_key, first_key + block) that query `query` sees.
inline int64_t visible_keys(bool causal, int64_t query, int64_t first_key, int64_t block, int64_t seq_q,
                            int64_t seq_k) {
  if (!causal) return block;
  const int64_t last_visible = query + seq_k - seq_q;  // bottom-right alignment
  return std::clamp<int64_t>(last_visible - first_key + 1, 0, block);
}

// Which keys each query row of one sequence sees: the bottom-right causal mask and sliding window of
// docs/architecture.md, with left/right = -1 for an unbounded side (causal: right = 0). Both ends
// of a row's range only grow down the rows, which is what lets the kernels skip whole tiles.
struct KeyRange {
  int64_t begin, end;  // [begin, end); empty when end <= begin
};

struct Mask {
  int64_t left, right, seq_q, seq_k;

  Mask(bool causal, int64_t window_left, int64_t window_right, int64_t seq_q, int64_t seq_k)
      : left(window_left), right(causal ? 0 : window_right), seq_q(seq_q), seq_k(seq_k) {}

  KeyRange keys_of(int64_t query) const {
    const int64_t diagonal = query + seq_k - seq_q;
    const int64_t begin = left >= 0 ? std::max<int64_t>(0, diagonal - left) : 0;
    const int64_t end = right >= 0 ? std::min<int64_t>(seq_k, diagonal + right + 1) : seq_k;
    return {begin, std::max(begin, end)};
  }

  // [begin, end) of the queries that see at least one key of [first_key, end_key)
  KeyRange queries_seeing(int64_t first_key, int64_t end_key) const {
    const int64_t offset = seq_k - seq_q;
    const int64_t begin = right >= 0 ? std::max<int64_t>(0, first_key - right - offset) : 0;
    const int64_t end = left >= 0 ? std::min<int64_t>(seq_q, end_key + left - offset) : seq_q;
    return {begin, std::max(begin, end)};
  }
};

// Whether bf16 inputs are multiplied in bf16 (fp32 accumulation; the probabilities and score
// gradients rounded to bf16 on the way into their products, as FlashAttention does on GPUs).
inline bool bf16_products(const at::Tensor& q) { return q.scalar_type() == at::kBFloat16 && bf16_gemm_available(); }

}  // namespace fastgpt::cpu
