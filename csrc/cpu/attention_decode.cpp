// Flash-decoding on the CPU: attention of 1-4 queries per sequence against a KV cache.
//
// Decoding is memory-bound: each query row does 2 * head_dim FLOPs per key against 2 * head_dim
// elements of K/V read. The tiled forward (attention.cpp) runs one task per query head, so a GQA
// group of `group` heads reads its K/V head `group` times. Here one task takes all the query rows of
// a (batch, kv_head) pair, group * seq_q of them (row r is head kv_head * group + r / seq_q, query
// r % seq_q), through one pass over its K/V: every K/V byte is read once. The products are vector
// code (simd.h) that reads bf16 K/V in place and computes in fp32: with so few rows a BLAS call
// costs more than it multiplies (MKL took 2.9x longer at GQA 32/8, 4k keys, fp32; bf16 through
// MKL's bf16 product was slower still), and probabilities are never rounded to bf16.
//
// Long caches are split: the keys of each (batch, kv_head) are cut into `splits` ranges, one task
// each, so that there are enough tasks for the threads even at batch 1 with few kv_heads. A task
// keeps its rows' unnormalized output, running max and sum; the last task of a (batch, kv_head) to
// finish merges its splits in split order with their log-sum-exp weights. The number of splits
// depends on the shape only, never on the thread count, so results are deterministic.
//
// Scratch buffers are kept per thread across calls: a decode call is short (tens of microseconds for
// a small model), and fresh, zero-filled buffers per call were a measurable part of that.
#include "attention_decode.h"

#include <torch/library.h>

#include <memory>
#include <string>

#include "attention_tiles.h"

namespace fastgpt::cpu {
namespace {

// keys per block: scores of a block (rows x kDecodeBlockK) stay in L1/L2
constexpr int64_t kDecodeBlockK = 256;
// split the keys of each (batch, kv_head) until there are this many tasks, keeping a split at least
// this many keys long
constexpr int64_t kDecodeTasks = 32;
constexpr int64_t kMinSplitKeys = 512;

// Test hook state: which path attention_forward() takes for few queries, and the splits to use.
enum class DecodeRoute : int { rule, always, never };
std::atomic<DecodeRoute> forced_route{DecodeRoute::rule};
std::atomic<int64_t> forced_splits{0};

int64_t decode_splits(int64_t pairs, int64_t seq_k) {
  const int64_t forced = forced_splits.load(std::memory_order_relaxed);
  const int64_t most = (seq_k + kMinSplitKeys - 1) / kMinSplitKeys;
  if (forced > 0) return std::min(forced, seq_k);
  return std::clamp<int64_t>((kDecodeTasks + pairs - 1) / pairs, 1, most);
}

// A per-thread buffer of at least n elements, reused by later calls on the same thread.
template <typename T>
T* thread_scratch(std::vector<T>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// ----------------------------------------------------------------------------- vector products

// The first `count` elements at p as fp32 lanes (the others 0); bf16 is the top half of an fp32.
__attribute__((always_inline)) inline Floats load_as_float(const float* p, int64_t count = kLanes) {
  return load_lanes(p, count);
}

__attribute__((always_inline)) inline Floats load_as_float(const c10::BFloat16* p, int64_t count = kLanes) {
  Uint16s halves{};
  std::memcpy(&halves, p, count * sizeof(uint16_t));
  const Uints bits = __builtin_convertvector(halves, Uints) << 16;
  Floats x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// Lane l of the result is the sum of the lanes of x[bit_reversed(l)]: a tree of 15 shuffle-adds, where
// summing each vector on its own would take 16 reductions.
__attribute__((always_inline)) inline Floats sum_lanes_of_16(const Floats* x) {
  Floats y[8], z[4], w[2];
  for (int i = 0; i < 8; ++i) {
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    z[i] = __builtin_shufflevector(y[2 * i], y[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(y[2 * i], y[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    w[i] = __builtin_shufflevector(z[2 * i], z[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(z[2 * i], z[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  return __builtin_shufflevector(w[0], w[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(w[0], w[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// scores[j] = scale * (q . k_j) for the keys j < count <= kLanes, k_j at k + j * ld. Keys past count
// repeat the last one (their scores are not stored). Each lane group of q is loaded once for 16 keys.
template <typename Elem>
__attribute__((always_inline)) inline void score_16_keys(const float* q, const Elem* k, int64_t ld, int64_t count,
                                                         int64_t head_dim, float scale, float* scores) {
  static constexpr int kBitReversed[kLanes] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  const Elem* rows[kLanes];
  for (int j = 0; j < kLanes; ++j) rows[j] = k + std::min<int64_t>(j, count - 1) * ld;
  Floats acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= head_dim; c += kLanes) {
    const Floats qc = load_lanes(q + c);
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) acc[kBitReversed[j]] += qc * load_as_float(rows[j] + c);
  }
  if (c < head_dim) {  // a head_dim that is not whole lane groups
    const Floats qc = load_lanes(q + c, head_dim - c);
    for (int j = 0; j < kLanes; ++j) acc[kBitReversed[j]] += qc * load_as_float(rows[j] + c, head_dim - c);
  }
  store_lanes(scores, sum_lanes_of_16(acc) * scale, count);
}

// scores (rows x keys, row stride keys) = scale * q (rows x head_dim, dense) . k^T (keys rows, stride ld)
template <typename Elem>
__attribute__((always_inline)) inline void score_block_body(const float* q, int64_t rows, const Elem* k, int64_t ld,
                                                            int64_t keys, int64_t head_dim, float scale,
                                                            float* scores) {
  for (int64_t first = 0; first < keys; first += kLanes) {  // 16 keys stay in L1 for every row
    for (int64_t r = 0; r < rows; ++r) {
      score_16_keys(q + r * head_dim, k + first * ld, ld, std::min<int64_t>(kLanes, keys - first), head_dim, scale,
                    scores + r * keys + first);
    }
  }
}

FASTGPT_CPU_DISPATCH void score_block(const float* q, int64_t rows, const float* k, int64_t ld, int64_t keys,
                                      int64_t head_dim, float scale, float* scores) {
  score_block_body(q, rows, k, ld, keys, head_dim, scale, scores);
}

FASTGPT_CPU_DISPATCH void score_block(const float* q, int64_t rows, const c10::BFloat16* k, int64_t ld, int64_t keys,
                                      int64_t head_dim, float scale, float* scores) {
  score_block_body(q, rows, k, ld, keys, head_dim, scale, scores);
}

// acc (Rows rows, stride head_dim) += probs (Rows rows, stride keys) . v (keys rows, stride ld), 64
// columns at a time: Rows x 4 accumulators stay in registers while the keys stream past.
template <int Rows, typename Elem>
__attribute__((always_inline)) inline void accumulate_rows(const float* probs, int64_t keys, const Elem* v, int64_t ld,
                                                           int64_t head_dim, float* acc) {
  constexpr int kVectors = 4;
  for (int64_t c0 = 0; c0 < head_dim; c0 += kVectors * kLanes) {
    int64_t lanes[kVectors];
    for (int t = 0; t < kVectors; ++t) lanes[t] = std::clamp<int64_t>(head_dim - c0 - t * kLanes, 0, kLanes);
    Floats a[Rows][kVectors];
    for (int r = 0; r < Rows; ++r) {
      for (int t = 0; t < kVectors; ++t) a[r][t] = load_lanes(acc + r * head_dim + c0 + t * kLanes, lanes[t]);
    }
    for (int64_t j = 0; j < keys; ++j) {
      const Elem* row = v + j * ld + c0;
      Floats values[kVectors];
      for (int t = 0; t < kVectors; ++t) {
        values[t] = lanes[t] == kLanes ? load_as_float(row + t * kLanes)
                                       : load_as_float(row + t * kLanes, lanes[t]);
      }
      for (int r = 0; r < Rows; ++r) {
        const Floats p = Floats{} + probs[r * keys + j];
        for (int t = 0; t < kVectors; ++t) a[r][t] += p * values[t];
      }
    }
    for (int r = 0; r < Rows; ++r) {
      for (int t = 0; t < kVectors; ++t) store_lanes(acc + r * head_dim + c0 + t * kLanes, a[r][t], lanes[t]);
    }
  }
}

template <typename Elem>
__attribute__((always_inline)) inline void accumulate_block_body(const float* probs, int64_t rows, const Elem* v,
                                                                 int64_t ld, int64_t keys, int64_t head_dim,
                                                                 float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) accumulate_rows<4>(probs + r * keys, keys, v, ld, head_dim, acc + r * head_dim);
  const float* p = probs + r * keys;
  float* a = acc + r * head_dim;
  switch (rows - r) {
    case 3: return accumulate_rows<3>(p, keys, v, ld, head_dim, a);
    case 2: return accumulate_rows<2>(p, keys, v, ld, head_dim, a);
    case 1: return accumulate_rows<1>(p, keys, v, ld, head_dim, a);
    default: return;
  }
}

FASTGPT_CPU_DISPATCH void accumulate_block(const float* probs, int64_t rows, const float* v, int64_t ld, int64_t keys,
                                           int64_t head_dim, float* acc) {
  accumulate_block_body(probs, rows, v, ld, keys, head_dim, acc);
}

FASTGPT_CPU_DISPATCH void accumulate_block(const float* probs, int64_t rows, const c10::BFloat16* v, int64_t ld,
                                           int64_t keys, int64_t head_dim, float* acc) {
  accumulate_block_body(probs, rows, v, ld, keys, head_dim, acc);
}

// ----------------------------------------------------------------------------- the kernel

// Normalizes an accumulated output row and stores it with its log-sum-exp; a row that saw no key
// gives o = 0 (written, not scaled: its zero probabilities times a NaN in v are NaN) and lse = -inf.
void finish_row(float* acc, int64_t head_dim, float row_max, float row_sum, at::ScalarType dtype, void* out_row,
                float* lse) {
  if (row_sum == 0.f) {
    std::fill(acc, acc + head_dim, 0.f);
  } else {
    scale_in_place(acc, head_dim, 1.f / row_sum);
  }
  store_row(acc, head_dim, dtype, out_row);
  *lse = row_sum > 0.f ? row_max + std::log(row_sum) : kNegInf;
}

// K/V are read as Elem: bf16 in place, everything else as fp32 (fp16 converted per block).
template <typename Elem>
void decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                    at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = q.size(0), heads = q.size(1), seq_q = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(1), seq_k = k.size(2), group = heads / kv_heads;
  const int64_t rows = group * seq_q, pairs = batch * kv_heads;
  const int64_t splits = decode_splits(pairs, seq_k), keys_per_split = (seq_k + splits - 1) / splits;
  const Heads q_heads(q), k_heads(k), v_heads(v);
  float* lse_out = lse.data_ptr<float>();

  // each split's rows: the unnormalized output, running max and sum, at (pair * splits + split) * rows + row
  const int64_t partial_rows = splits > 1 ? pairs * splits * rows : 0;
  std::unique_ptr<float[]> partial_acc(new float[partial_rows * head_dim]), partial_max(new float[partial_rows]),
      partial_sum(new float[partial_rows]);
  std::unique_ptr<std::atomic<int64_t>[]> splits_done(new std::atomic<int64_t>[splits > 1 ? pairs : 0]);
  for (int64_t pair = 0; splits > 1 && pair < pairs; ++pair) splits_done[pair].store(0);

  // output row of row r of a pair's rows
  auto out_row_index = [&](int64_t pair, int64_t r) {
    const int64_t b = pair / kv_heads, h = pair % kv_heads * group + r / seq_q;
    return (b * heads + h) * seq_q + r % seq_q;
  };
  auto merge_splits = [&](int64_t pair, float* acc) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t first = pair * splits * rows + r;
      float total_max = kNegInf;
      for (int64_t split = 0; split < splits; ++split) total_max = std::max(total_max, partial_max[first + split * rows]);
      float total_sum = 0.f;
      std::fill(acc, acc + head_dim, 0.f);
      for (int64_t split = 0; split < splits && total_max != kNegInf; ++split) {
        const int64_t at = first + split * rows;
        const float weight = std::exp(partial_max[at] - total_max);  // 0 for a split the row saw nothing of
        total_sum += partial_sum[at] * weight;
        const float* values = &partial_acc[at * head_dim];
        for (int64_t c = 0; c < head_dim; ++c) acc[c] += values[c] * weight;
      }
      const int64_t out_row = out_row_index(pair, r);
      finish_row(acc, head_dim, total_max, total_sum, out.scalar_type(), mutable_element_ptr(out, out_row * head_dim),
                 &lse_out[out_row]);
    }
  };

  const int64_t tasks = pairs * splits;
  run_tasks_dynamically(tasks, [&](const auto& next_task) {
    thread_local std::vector<Elem> k_buffer, v_buffer;
    thread_local std::vector<float> q_buffer, scores_buffer, acc_buffer, max_buffer, sum_buffer;
    float* q_rows = thread_scratch(q_buffer, rows * head_dim);
    Elem* k_tile = thread_scratch(k_buffer, kDecodeBlockK * head_dim);
    Elem* v_tile = thread_scratch(v_buffer, kDecodeBlockK * head_dim);
    float* scores = thread_scratch(scores_buffer, rows * kDecodeBlockK);
    float* acc = thread_scratch(acc_buffer, rows * head_dim);
    float* row_max = thread_scratch(max_buffer, rows);
    float* row_sum = thread_scratch(sum_buffer, rows);

    for (int64_t task = next_task(); task < tasks; task = next_task()) {
      const int64_t pair = task / splits, split = task % splits;
      const int64_t b = pair / kv_heads, kv_head = pair % kv_heads;
      const int64_t key_begin = split * keys_per_split, key_end = std::min(seq_k, key_begin + keys_per_split);

      for (int64_t member = 0; member < group; ++member) {  // the group's query rows, dense fp32
        q_heads.load(b, kv_head * group + member, 0, seq_q, head_dim, q_rows + member * seq_q * head_dim);
      }
      std::fill(acc, acc + rows * head_dim, 0.f);
      std::fill(row_max, row_max + rows, kNegInf);
      std::fill(row_sum, row_sum + rows, 0.f);

      for (int64_t first_key = key_begin; first_key < key_end; first_key += kDecodeBlockK) {
        const int64_t block_k = std::min(kDecodeBlockK, key_end - first_key);
        const Tile<Elem> k_rows = k_heads.tile(b, kv_head, first_key, block_k, head_dim, k_tile);
        const Tile<Elem> v_rows = v_heads.tile(b, kv_head, first_key, block_k, head_dim, v_tile);
        score_block(q_rows, rows, k_rows.data, k_rows.ld, block_k, head_dim, static_cast<float>(scale), scores);

        // online softmax, as in the tiled forward; only the last keys are ever masked (bottom-right)
        for (int64_t r = 0; r < rows; ++r) {
          float* row = scores + r * block_k;
          const int64_t visible = visible_keys(causal, r % seq_q, first_key, block_k, seq_q, seq_k);
          std::fill(row + visible, row + block_k, 0.f);
          if (visible == 0) continue;
          const float new_max = std::max(row_max[r], max_of(row, visible));
          const float rescale = std::exp(row_max[r] - new_max);
          row_sum[r] = row_sum[r] * rescale + exp_in_place(row, visible, 1.f, new_max);
          row_max[r] = new_max;
          if (rescale != 1.f) scale_in_place(acc + r * head_dim, head_dim, rescale);
        }
        accumulate_block(scores, rows, v_rows.data, v_rows.ld, block_k, head_dim, acc);
      }

      if (splits == 1) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t out_row = out_row_index(pair, r);
          finish_row(acc + r * head_dim, head_dim, row_max[r], row_sum[r], out.scalar_type(),
                     mutable_element_ptr(out, out_row * head_dim), &lse_out[out_row]);
        }
        continue;
      }
      const int64_t first = (pair * splits + split) * rows;
      std::memcpy(&partial_acc[first * head_dim], acc, rows * head_dim * sizeof(float));
      std::memcpy(&partial_max[first], row_max, rows * sizeof(float));
      std::memcpy(&partial_sum[first], row_sum, rows * sizeof(float));
      // acq_rel: the merging task sees every other split's partials
      if (splits_done[pair].fetch_add(1, std::memory_order_acq_rel) == splits - 1) merge_splits(pair, acc);
    }
  });
}

// Test hook: route = "rule" (attention_forward decides), "always" or "never" (the decode kernel for
// every input it takes, or for none); splits > 0 forces that many splits of the keys (0: chosen).
void set_cpu_decode(const std::string& route, int64_t splits) {
  TORCH_CHECK(route == "rule" || route == "always" || route == "never",
              "fastgpt _set_cpu_decode: route must be 'rule', 'always' or 'never', got '", route, "'");
  TORCH_CHECK(splits >= 0, "fastgpt _set_cpu_decode: splits must be >= 0 (0: chosen by the kernel), got ", splits);
  forced_route.store(route == "rule" ? DecodeRoute::rule : route == "always" ? DecodeRoute::always : DecodeRoute::never);
  forced_splits.store(splits);
}

}  // namespace

bool use_decode_kernel(const at::Tensor& q, const at::Tensor& k) {
  if (q.size(2) > kDecodeMaxQueries) return false;
  switch (forced_route.load(std::memory_order_relaxed)) {
    case DecodeRoute::always: return true;
    case DecodeRoute::never: return false;
    case DecodeRoute::rule: break;
  }
  return true;
}

void attention_decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                              double scale, at::Tensor& out, at::Tensor& lse) {
  TORCH_CHECK(q.size(2) <= kDecodeMaxQueries, "fastgpt decode attention: at most ", kDecodeMaxQueries,
              " queries per sequence, got ", q.size(2));
  if (q.scalar_type() == at::kBFloat16) {
    decode_forward<c10::BFloat16>(q, k, v, causal, scale, out, lse);
  } else {
    decode_forward<float>(q, k, v, causal, scale, out, lse);
  }
}

}  // namespace fastgpt::cpu

TORCH_LIBRARY_FRAGMENT(fastgpt, m) {
  m.def("_set_cpu_decode(str route, int splits=0) -> ()", &fastgpt::cpu::set_cpu_decode);
}
