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
// bf16 K/V are read 32 values (64 bytes) per load. Seen as 16 32-bit words, word i holds value 2i
// in its low half and 2i + 1 in its high half, and a bf16 is the top half of an fp32: one shift
// gives the even-indexed values as fp32, one mask the odd ones (GCC widens 16 bf16 in order with
// five instructions, which made the bf16 kernel compute-bound at 20-40% of the copy rate). So for
// bf16 the query rows and the output accumulator are kept in the same "pair order": each 32
// columns as their 16 even then their 16 odd ones, padded to whole 32-column chunks; the output
// is put back in column order when stored. fp32 K/V keep column order. Where the CPU has
// AVX512-BF16, bf16 scores take its dot product instead (score_block_dot): bf16 q . k in pairs of
// adjacent values, no widening at all.
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

// ----------------------------------------------------------------------------- bf16 pair order

constexpr int64_t kPairChunk = 2 * kLanes;  // columns per bf16 load

// Columns a row of head_dim values takes in the kernel's buffers: whole chunks in pair order for bf16.
template <typename Elem>
int64_t row_width(int64_t head_dim) {
  if constexpr (std::is_same_v<Elem, float>) return head_dim;
  return (head_dim + kPairChunk - 1) / kPairChunk * kPairChunk;
}

// Where column c of a row sits in pair order.
inline int64_t pair_position(int64_t c) { return c / kPairChunk * kPairChunk + c % 2 * kLanes + c % kPairChunk / 2; }

// dense (head_dim values in column order) to pair order (row_width columns, padding 0), and back
inline void to_pair_order(const float* dense, int64_t head_dim, float* pairs) {
  std::fill(pairs, pairs + row_width<c10::BFloat16>(head_dim), 0.f);
  for (int64_t c = 0; c < head_dim; ++c) pairs[pair_position(c)] = dense[c];
}

inline void from_pair_order(const float* pairs, int64_t head_dim, float* dense) {
  for (int64_t c = 0; c < head_dim; ++c) dense[c] = pairs[pair_position(c)];
}

// The first `count` (<= 32) bf16 at p as fp32: the even-indexed ones in `even`, the odd ones in
// `odd` (lanes past count 0).
__attribute__((always_inline)) inline void load_pairs(const c10::BFloat16* p, int64_t count, Floats& even,
                                                      Floats& odd) {
  Uints words{};
  std::memcpy(&words, p, count * sizeof(uint16_t));
  const Uints low = words << 16, high = words & 0xFFFF0000u;
  std::memcpy(&even, &low, sizeof even);
  std::memcpy(&odd, &high, sizeof odd);
}

// ----------------------------------------------------------------------------- vector products

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

// The vector that sum_lanes_of_16 sums into lane j: accumulating key j's products in
// acc[kBitReversed[j]] leaves the 16 keys' scores in order.
constexpr int kBitReversed[kLanes] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// rows[j] = the row of key j < count <= kLanes at k + j * ld; keys past count repeat the last one
// (their scores are computed and not stored), so every product reads a real row.
template <typename Elem>
__attribute__((always_inline)) inline void rows_of_16_keys(const Elem* k, int64_t ld, int64_t count,
                                                           const Elem** rows) {
  for (int j = 0; j < kLanes; ++j) rows[j] = k + std::min<int64_t>(j, count - 1) * ld;
}

// scores[j] = scale * (q . k_j) for the keys j < count <= kLanes, k_j at k + j * ld. Keys past count
// repeat the last one (their scores are not stored). Each lane group of q is loaded once for 16 keys.
__attribute__((always_inline)) inline void score_16_keys(const float* q, const float* k, int64_t ld, int64_t count,
                                                         int64_t head_dim, float scale, float* scores) {
  const float* rows[kLanes];
  rows_of_16_keys(k, ld, count, rows);
  Floats acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= head_dim; c += kLanes) {
    const Floats qc = load_lanes(q + c);
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) acc[kBitReversed[j]] += qc * load_lanes(rows[j] + c);
  }
  if (c < head_dim) {  // a head_dim that is not whole lane groups
    const Floats qc = load_lanes(q + c, head_dim - c);
    for (int j = 0; j < kLanes; ++j) acc[kBitReversed[j]] += qc * load_lanes(rows[j] + c, head_dim - c);
  }
  store_lanes(scores, sum_lanes_of_16(acc) * scale, count);
}

// The same for bf16 keys, q in pair order: each load of a key gives 32 of its values, two products.
__attribute__((always_inline)) inline void score_16_keys(const float* q, const c10::BFloat16* k, int64_t ld,
                                                         int64_t count, int64_t head_dim, float scale,
                                                         float* scores) {
  const c10::BFloat16* rows[kLanes];
  rows_of_16_keys(k, ld, count, rows);
  Floats acc[kLanes] = {};
  auto chunk = [&](int64_t c, int64_t values) __attribute__((always_inline)) {
    const Floats q_even = load_lanes(q + c), q_odd = load_lanes(q + c + kLanes);
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) {
      Floats even, odd;
      load_pairs(rows[j] + c, values, even, odd);
      acc[kBitReversed[j]] += q_even * even;
      acc[kBitReversed[j]] += q_odd * odd;
    }
  };
  int64_t c = 0;
  for (; c + kPairChunk <= head_dim; c += kPairChunk) chunk(c, kPairChunk);
  if (c < head_dim) chunk(c, head_dim - c);  // a head_dim that is not whole chunks
  store_lanes(scores, sum_lanes_of_16(acc) * scale, count);
}

// Asks for columns [c0, c0 + count) of rows [first, last) of K or V (stride ld) to be brought into
// cache ahead of the products that read them, so that the memory reads overlap the arithmetic: a
// cache larger than L3 ran at half the copy rate without (16k keys, bf16).
template <typename Elem>
__attribute__((always_inline)) inline void prefetch_rows(const Elem* rows, int64_t ld, int64_t first, int64_t last,
                                                         int64_t c0, int64_t count) {
  constexpr int64_t kLine = 64 / sizeof(Elem);  // elements per cache line
  for (int64_t j = first; j < last; ++j) {
    for (int64_t c = c0; c < c0 + count; c += kLine) __builtin_prefetch(rows + j * ld + c);
  }
}

// keys ahead of the ones multiplied that prefetch_rows asks for
constexpr int64_t kPrefetchKeys = 2 * kLanes;

// scores (rows x keys, row stride keys) = scale * q (rows x row_width, dense) . k^T (keys rows, stride ld)
template <typename Elem>
__attribute__((always_inline)) inline void score_block_body(const float* q, int64_t rows, const Elem* k, int64_t ld,
                                                            int64_t keys, int64_t head_dim, float scale,
                                                            float* scores) {
  for (int64_t first = 0; first < keys; first += kLanes) {  // 16 keys stay in L1 for every row
    const int64_t ahead = first + kPrefetchKeys;
    prefetch_rows(k, ld, std::min(ahead, keys), std::min(ahead + kLanes, keys), 0, head_dim);
    for (int64_t r = 0; r < rows; ++r) {
      score_16_keys(q + r * row_width<Elem>(head_dim), k + first * ld, ld, std::min<int64_t>(kLanes, keys - first),
                    head_dim, scale, scores + r * keys + first);
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

#if defined(__GNUC__) && defined(__x86_64__)
// The same for bf16 q (rows x head_dim, dense) and K on AVX512-BF16 (call only where
// bf16_dot_available()): each VDPBF16PS multiplies 16 pairs of adjacent values of a q row and a key
// row into fp32 sums, one instruction per 32 values where widening K took four and two FMAs. The
// products of two bf16 are exact in fp32, as on the vector path; denormal inputs read as 0.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void score_block_dot(
    const c10::BFloat16* q, int64_t rows, const c10::BFloat16* k, int64_t ld, int64_t keys, int64_t head_dim,
    float scale, float* scores) {
  for (int64_t first = 0; first < keys; first += kLanes) {
    const int64_t ahead = first + kPrefetchKeys, count = std::min<int64_t>(kLanes, keys - first);
    prefetch_rows(k, ld, std::min(ahead, keys), std::min(ahead + kLanes, keys), 0, head_dim);
    const c10::BFloat16* key_rows[kLanes];
    rows_of_16_keys(k + first * ld, ld, count, key_rows);
    for (int64_t r = 0; r < rows; ++r) {
      Floats acc[kLanes] = {};
      for (int64_t c = 0; c < head_dim; c += kPairChunk) {
        const __mmask32 in_row = c + kPairChunk <= head_dim ? ~__mmask32{0} : (__mmask32{1} << (head_dim - c)) - 1;
        const __m512bh q_pairs = (__m512bh)_mm512_maskz_loadu_epi16(in_row, q + r * head_dim + c);
#pragma GCC unroll 16
        for (int j = 0; j < kLanes; ++j) {
          const __m512bh k_pairs = (__m512bh)_mm512_maskz_loadu_epi16(in_row, key_rows[j] + c);
          acc[kBitReversed[j]] = (Floats)_mm512_dpbf16_ps((__m512)acc[kBitReversed[j]], q_pairs, k_pairs);
        }
      }
      store_lanes(scores + r * keys + first, sum_lanes_of_16(acc) * scale, count);
    }
  }
}
#else
void score_block_dot(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t, float, float*) {
  TORCH_CHECK(false, "fastgpt: score_block_dot called where AVX512-BF16 is unavailable");
}
#endif

// The 64 values of a V row from column c0 on, in the order of the accumulator's vectors t = 0..3:
// fp32 in column order, bf16 as two chunks in pair order. Whole: all 64 are columns of the row
// (constant-size loads); else the row's columns past head_dim read as 0.
template <bool Whole>
__attribute__((always_inline)) inline void load_values(const float* row, int64_t c0, int64_t head_dim, Floats* values) {
  for (int t = 0; t < 4; ++t) {
    const int64_t c = c0 + t * kLanes;
    values[t] = Whole ? load_lanes(row + c) : load_lanes(row + c, std::clamp<int64_t>(head_dim - c, 0, kLanes));
  }
}

template <bool Whole>
__attribute__((always_inline)) inline void load_values(const c10::BFloat16* row, int64_t c0, int64_t head_dim,
                                                       Floats* values) {
  for (int chunk = 0; chunk < 2; ++chunk) {
    const int64_t c = c0 + chunk * kPairChunk;
    const int64_t count = Whole ? kPairChunk : std::clamp<int64_t>(head_dim - c, 0, kPairChunk);
    load_pairs(row + c, count, values[2 * chunk], values[2 * chunk + 1]);
  }
}

// x in every lane, one broadcast (a 16-value initializer became 16 lane inserts; 0 + x an add more)
__attribute__((always_inline)) inline Floats broadcast(float x) {
  Floats first{};
  first[0] = x;
  return __builtin_shufflevector(first, first, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

// acc (Rows rows of row_width<Elem> columns, columns [c0, c0 + 64) of them) += probs (Rows rows,
// stride keys) . v (keys rows, stride ld): Rows x 4 accumulators stay in registers while the keys
// stream past.
template <int Rows, bool Whole, typename Elem>
__attribute__((always_inline)) inline void accumulate_columns(const float* probs, int64_t keys, const Elem* v,
                                                              int64_t ld, int64_t head_dim, int64_t c0, float* acc) {
  constexpr int kVectors = 4;
  const int64_t width = row_width<Elem>(head_dim);
  int64_t lanes[kVectors];  // of the accumulator's rows
  for (int t = 0; t < kVectors; ++t) lanes[t] = Whole ? kLanes : std::clamp<int64_t>(width - c0 - t * kLanes, 0, kLanes);
  Floats a[Rows][kVectors];
  for (int r = 0; r < Rows; ++r) {
    for (int t = 0; t < kVectors; ++t) a[r][t] = load_lanes(acc + r * width + c0 + t * kLanes, lanes[t]);
  }
  for (int64_t j = 0; j < keys; ++j) {
    if (j + kPrefetchKeys < keys) prefetch_rows(v, ld, j + kPrefetchKeys, j + kPrefetchKeys + 1, c0, 4 * kLanes);
    Floats values[kVectors];
    load_values<Whole>(v + j * ld, c0, head_dim, values);
    for (int r = 0; r < Rows; ++r) {
      const Floats p = broadcast(probs[r * keys + j]);
      for (int t = 0; t < kVectors; ++t) a[r][t] += p * values[t];
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int t = 0; t < kVectors; ++t) store_lanes(acc + r * width + c0 + t * kLanes, a[r][t], lanes[t]);
  }
}

template <int Rows, typename Elem>
__attribute__((always_inline)) inline void accumulate_rows(const float* probs, int64_t keys, const Elem* v, int64_t ld,
                                                           int64_t head_dim, float* acc) {
  constexpr int64_t kColumns = 4 * kLanes;
  int64_t c0 = 0;
  for (; c0 + kColumns <= head_dim; c0 += kColumns) accumulate_columns<Rows, true>(probs, keys, v, ld, head_dim, c0, acc);
  if (c0 < head_dim) accumulate_columns<Rows, false>(probs, keys, v, ld, head_dim, c0, acc);
}

template <typename Elem>
__attribute__((always_inline)) inline void accumulate_block_body(const float* probs, int64_t rows, const Elem* v,
                                                                 int64_t ld, int64_t keys, int64_t head_dim,
                                                                 float* acc) {
  const int64_t width = row_width<Elem>(head_dim);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) accumulate_rows<4>(probs + r * keys, keys, v, ld, head_dim, acc + r * width);
  const float* p = probs + r * keys;
  float* a = acc + r * width;
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

// Normalizes an accumulated output row (row_width<Elem> columns in the kernel's order; `dense`
// scratch of head_dim) and stores it with its log-sum-exp; a row that saw no key gives o = 0
// (written, not scaled: its zero probabilities times a NaN in v are NaN) and lse = -inf.
template <typename Elem>
void finish_row(const float* acc, int64_t head_dim, float row_max, float row_sum, at::ScalarType dtype,
                void* out_row, float* lse, float* dense) {
  if constexpr (std::is_same_v<Elem, float>) {
    std::copy(acc, acc + head_dim, dense);
  } else {
    from_pair_order(acc, head_dim, dense);
  }
  if (row_sum == 0.f) {
    std::fill(dense, dense + head_dim, 0.f);
  } else {
    scale_in_place(dense, head_dim, 1.f / row_sum);
  }
  store_row(dense, head_dim, dtype, out_row);
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
  const int64_t width = row_width<Elem>(head_dim);  // columns of a query or output row in the buffers
  const bool use_dot = !std::is_same_v<Elem, float> && bf16_dot_available();
  const float score_scale = static_cast<float>(scale);
  const Heads q_heads(q), k_heads(k), v_heads(v);
  float* lse_out = lse.data_ptr<float>();

  // each split's rows: the unnormalized output, running max and sum, at (pair * splits + split) * rows + row
  const int64_t partial_rows = splits > 1 ? pairs * splits * rows : 0;
  std::unique_ptr<float[]> partial_acc(new float[partial_rows * width]), partial_max(new float[partial_rows]),
      partial_sum(new float[partial_rows]);
  std::unique_ptr<std::atomic<int64_t>[]> splits_done(new std::atomic<int64_t>[splits > 1 ? pairs : 0]);
  for (int64_t pair = 0; splits > 1 && pair < pairs; ++pair) splits_done[pair].store(0);

  // output row of row r of a pair's rows
  auto out_row_index = [&](int64_t pair, int64_t r) {
    const int64_t b = pair / kv_heads, h = pair % kv_heads * group + r / seq_q;
    return (b * heads + h) * seq_q + r % seq_q;
  };
  auto merge_splits = [&](int64_t pair, float* acc, float* dense) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t first = pair * splits * rows + r;
      float total_max = kNegInf;
      for (int64_t split = 0; split < splits; ++split) total_max = std::max(total_max, partial_max[first + split * rows]);
      float total_sum = 0.f;
      std::fill(acc, acc + width, 0.f);
      for (int64_t split = 0; split < splits && total_max != kNegInf; ++split) {
        const int64_t at = first + split * rows;
        const float weight = std::exp(partial_max[at] - total_max);  // 0 for a split the row saw nothing of
        total_sum += partial_sum[at] * weight;
        const float* values = &partial_acc[at * width];
        for (int64_t c = 0; c < width; ++c) acc[c] += values[c] * weight;
      }
      const int64_t out_row = out_row_index(pair, r);
      finish_row<Elem>(acc, head_dim, total_max, total_sum, out.scalar_type(),
                       mutable_element_ptr(out, out_row * head_dim), &lse_out[out_row], dense);
    }
  };

  const int64_t tasks = pairs * splits;
  run_tasks_dynamically(tasks, [&](const auto& next_task) {
    thread_local std::vector<Elem> k_buffer, v_buffer;
    thread_local std::vector<float> q_buffer, dense_buffer, scores_buffer, acc_buffer, max_buffer, sum_buffer;
    float* q_rows = thread_scratch(q_buffer, rows * width);
    float* dense = thread_scratch(dense_buffer, head_dim);  // one row in column order
    thread_local std::vector<c10::BFloat16> q_dot_buffer;  // score_block_dot's q rows
    c10::BFloat16* q_dot = use_dot ? thread_scratch(q_dot_buffer, rows * head_dim) : nullptr;
    Elem* k_tile = thread_scratch(k_buffer, kDecodeBlockK * head_dim);
    Elem* v_tile = thread_scratch(v_buffer, kDecodeBlockK * head_dim);
    float* scores = thread_scratch(scores_buffer, rows * kDecodeBlockK);
    float* acc = thread_scratch(acc_buffer, rows * width);
    float* row_max = thread_scratch(max_buffer, rows);
    float* row_sum = thread_scratch(sum_buffer, rows);

    for (int64_t task = next_task(); task < tasks; task = next_task()) {
      const int64_t pair = task / splits, split = task % splits;
      const int64_t b = pair / kv_heads, kv_head = pair % kv_heads;
      const int64_t key_begin = split * keys_per_split, key_end = std::min(seq_k, key_begin + keys_per_split);

      for (int64_t r = 0; r < rows; ++r) {  // the group's query rows as fp32, in the kernel's order
        float* q_row = q_rows + r * width;
        if constexpr (std::is_same_v<Elem, float>) {
          q_heads.load(b, kv_head * group + r / seq_q, r % seq_q, 1, head_dim, q_row);
        } else {
          q_heads.load(b, kv_head * group + r / seq_q, r % seq_q, 1, head_dim, dense);
          to_pair_order(dense, head_dim, q_row);
          if (use_dot) std::copy(dense, dense + head_dim, q_dot + r * head_dim);  // exact: q is bf16
        }
      }
      std::fill(acc, acc + rows * width, 0.f);
      std::fill(row_max, row_max + rows, kNegInf);
      std::fill(row_sum, row_sum + rows, 0.f);

      for (int64_t first_key = key_begin; first_key < key_end; first_key += kDecodeBlockK) {
        const int64_t block_k = std::min(kDecodeBlockK, key_end - first_key);
        const Tile<Elem> k_rows = k_heads.tile(b, kv_head, first_key, block_k, head_dim, k_tile);
        const Tile<Elem> v_rows = v_heads.tile(b, kv_head, first_key, block_k, head_dim, v_tile);
        if constexpr (!std::is_same_v<Elem, float>) {
          if (use_dot) score_block_dot(q_dot, rows, k_rows.data, k_rows.ld, block_k, head_dim, score_scale, scores);
        }
        if (!use_dot) score_block(q_rows, rows, k_rows.data, k_rows.ld, block_k, head_dim, score_scale, scores);

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
          if (rescale != 1.f) scale_in_place(acc + r * width, width, rescale);
        }
        accumulate_block(scores, rows, v_rows.data, v_rows.ld, block_k, head_dim, acc);
      }

      if (splits == 1) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t out_row = out_row_index(pair, r);
          finish_row<Elem>(acc + r * width, head_dim, row_max[r], row_sum[r], out.scalar_type(),
                           mutable_element_ptr(out, out_row * head_dim), &lse_out[out_row], dense);
        }
        continue;
      }
      const int64_t first = (pair * splits + split) * rows;
      std::memcpy(&partial_acc[first * width], acc, rows * width * sizeof(float));
      std::memcpy(&partial_max[first], row_max, rows * sizeof(float));
      std::memcpy(&partial_sum[first], row_sum, rows * sizeof(float));
      // acq_rel: the merging task sees every other split's partials
      if (splits_done[pair].fetch_add(1, std::memory_order_acq_rel) == splits - 1) merge_splits(pair, acc, dense);
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
