// Flash-style attention on the CPU: forward and backward, fp32 accumulation, O(seq) memory.
//
// Queries are processed in blocks against blocks of keys with an online softmax, so no
// seq_q x seq_k matrix ever exists: per thread there is one block of scores. Tiles of q/k/v
// (any strides, fp32/fp16/bf16) are converted to dense fp32 on load (fp32 tiles with a unit
// inner stride are used in place). The tile products go to torch's BLAS (MKL on x86-64) through
// gemm.h. bf16 inputs, on a CPU with bf16 units (AMX, AVX512-BF16), keep bf16 tiles and
// multiply them in bf16 with fp32 accumulation, rounding the fp32 probabilities and score gradients
// to bf16 on the way into their products as FlashAttention does on GPUs: about 1.4x faster forward
// and 1.6x forward+backward than fp32 tiles at (4, 8, 1024, 64) on an AMX Xeon. On AVX512-BF16
// without AMX (AMD EPYC: there MKL's bf16 product converts to fp32 and runs its fp32 kernel) the
// forward lays K and V out once per call in pairs (PairedKV) and multiplies on gemm_bf16_pairs
// (VDPBF16PS), the probabilities rounded to bf16 as they are computed (exp_to_bf16): 3.5-5x SDPA
// on one core (benchmarks/attention_bf16_cpu.py). Measured on one core for a
// 128x128x64 tile product: MKL 132 GFLOP/s against 108 for a register-blocked 4x32 AVX-512
// micro-kernel (144 vs 82 at 128x512x64); at::vec::Vectorized is scalar code in this
// baseline-x86-64 build. exp() and the other row loops are vector code compiled for several ISAs
// (simd.h).
//
// The variants of docs/architecture.md run in the same loops. Each query row sees a range of keys
// (Mask in attention_tiles.h: the bottom-right causal mask and the sliding window) whose ends only
// grow down the rows, so a query block visits only the key tiles its rows see, and a key block
// (backward) only the query tiles that see it: a sliding window costs what its width costs, not
// the sequence. The rows of a block that see only part of a key block are multiplied in bands of
// kBandRows rows, each against the keys its rows see together, and masked row by row; rows that
// see the whole block form one band with no mask. Under a causal mask most of the masked corner of
// a diagonal block is never computed (at 1024 keys in blocks of 128, 8% of all products). The soft
// cap is applied to the scores of the keys a row sees, in the tile's softmax; the backward
// multiplies the score gradients by its derivative, 1 - tanh^2, kept from recomputing the scores.
//
// A call attends within Sequences: the batch of a dense call, or the packed sequences of a varlen
// call ((total, heads, head_dim) tensors read as (1, heads, total, head_dim) views, each sequence
// a range of rows given by cu_seqlens). Parallelism, with tasks handed out dynamically: the
// forward over (sequence, head, query block), the last blocks of each first; the backward over sequences x
// kv_heads x (a fixed number of splits of each sequence's key blocks).
// A backward task owns dK/dV of its key blocks and accumulates dQ into the fp32 partial buffer
// of its split (with one split and fp32 q, into dQ itself); the partials are summed in split
// order. Nothing depends on the thread count, so the results are deterministic.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "alloc_output.h"
#include "attention_decode.h"
#include "attention_tiles.h"
#include "ops.h"

namespace fastgpt::cpu {
namespace {

// tile sizes measured best for head_dim 64 on a 2-core AVX-512 machine (MKL sgemm on the tiles)
constexpr int64_t kForwardBlockQ = 128;
constexpr int64_t kForwardBlockK = 512;
constexpr int64_t kBackwardBlockQ = 128;
constexpr int64_t kBackwardBlockK = 128;
// rows per band where the mask cuts a block (see the top of the file)
constexpr int64_t kBandRows = 32;
// the backward splits the key blocks of each (sequence, kv_head) until there are this many tasks
constexpr int64_t kMinBackwardTasks = 16;

// grad[j] = probs[j] * (grad[j] - delta): the softmax backward, dS = P * (dP - rowsum(dO * O))
FASTGPT_CPU_DISPATCH void softmax_backward_in_place(float* grad, const float* probs, int64_t n, float delta) {
  for_lanes(n, [&](int64_t j, int64_t count) {
    store_lanes(grad + j, load_lanes(probs + j, count) * (load_lanes(grad + j, count) - delta), count);
  });
}

// row[j] *= factors[j] for j < n
FASTGPT_CPU_DISPATCH void multiply_in_place(float* row, const float* factors, int64_t n) {
  for_lanes(n, [&](int64_t j, int64_t count) {
    store_lanes(row + j, load_lanes(row + j, count) * load_lanes(factors + j, count), count);
  });
}

FASTGPT_CPU_DISPATCH float dot(const float* a, const float* b, int64_t n) {
  Floats sums{};
  for_lanes(n, [&](int64_t j, int64_t count) { sums += load_lanes(a + j, count) * load_lanes(b + j, count); });
  return sum_lanes(sums);
}

// One sequence a call attends within: rows [q_start, q_start + seq_q) of q and [k_start, k_start +
// seq_k) of k/v, in batch entry `batch` of the (batch, heads, rows, head_dim) views.
struct Sequence {
  int64_t batch, q_start, seq_q, k_start, seq_k;
};

// The options every sequence of a call shares.
struct Variants {
  bool causal;
  int64_t window_left, window_right;
  float softcap;  // 0: off

  bool plain() const { return window_left < 0 && window_right < 0 && softcap == 0.f; }
  Mask mask(const Sequence& s) const { return Mask(causal, window_left, window_right, s.seq_q, s.seq_k); }
};

// Rows of a (batch, heads, rows, head_dim) view with a unit inner stride: an output written row by
// row, or (Value = float) an fp32 accumulator.
template <typename Value>
struct Rows {
  Value* data;
  int64_t stride_batch, stride_head, stride_seq;

  Value* row(int64_t b, int64_t h, int64_t s) const {
    return data + b * stride_batch + h * stride_head + s * stride_seq;
  }
};

Rows<char> output_rows(const at::Tensor& view) {  // byte addresses: the element size is applied here
  const int64_t size = view.element_size();
  return {static_cast<char*>(view.data_ptr()), view.stride(0) * size, view.stride(1) * size, view.stride(2) * size};
}

Rows<float> float_rows(float* data, const at::Tensor& view) {
  return {data, view.stride(0), view.stride(1), view.stride(2)};
}

// The keys of a key block [first_key, ...) that `query` sees, block-relative, within [begin, end).
KeyRange row_keys(const Mask& mask, int64_t query, int64_t first_key, int64_t begin, int64_t end) {
  const KeyRange keys = mask.keys_of(query);
  const int64_t first = std::clamp(keys.begin - first_key, begin, end);
  return {first, std::clamp(keys.end - first_key, first, end)};
}

// Calls body(first_row, end_row, begin, end) for bands of rows of a query block (block_q rows from
// first_query) against a key block (block_k keys from first_key): every row of the band sees only
// keys in [begin, end) of the block. Rows that see the whole block are gathered into bands with
// begin = 0, end = block_k that need no mask; the others are taken kBandRows at a time, each band
// against the keys its rows see together. Bands whose rows see no key of the block are skipped.
template <typename Body>
void for_row_bands(const Mask& mask, int64_t first_query, int64_t block_q, int64_t first_key, int64_t block_k,
                   Body&& body) {
  int64_t full_from = -1;  // first row of the run of bands that see the whole block
  auto end_full_run = [&](int64_t end_row) {
    if (full_from >= 0) body(full_from, end_row, int64_t{0}, block_k);
    full_from = -1;
  };
  for (int64_t first_row = 0; first_row < block_q; first_row += kBandRows) {
    const int64_t end_row = std::min(first_row + kBandRows, block_q);
    const KeyRange first = mask.keys_of(first_query + first_row), last = mask.keys_of(first_query + end_row - 1);
    if (last.begin <= first_key && first.end >= first_key + block_k) {
      if (full_from < 0) full_from = first_row;
      continue;
    }
    end_full_run(first_row);
    const int64_t begin = std::clamp<int64_t>(first.begin - first_key, 0, block_k);
    const int64_t end = std::clamp<int64_t>(last.end - first_key, 0, block_k);
    if (begin < end) body(first_row, end_row, begin, end);
  }
  end_full_run(block_q);
}

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool packed = false) {
  const int64_t dims = packed ? 3 : 4;
  const char* layout = packed ? " (total, heads, head_dim)" : " (batch, heads, seq, head_dim)";
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    TORCH_CHECK(t.device().is_cpu(), "fastgpt native attention (CPU): ", name, " must be a CPU tensor, got ",
                t.device());
    TORCH_CHECK(t.dim() == dims, "fastgpt native attention: ", name, " must be ", dims, "-dimensional", layout,
                ", got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                "fastgpt native attention: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "fastgpt native attention: ", name, " must have the dtype of q (",
                q.scalar_type(), "), got ", t.scalar_type());
    // a packed batch may hold no rows (every sequence empty); heads and head_dim never are
    for (int64_t d = packed ? 1 : 0; d < dims; ++d) {
      TORCH_CHECK(t.size(d) > 0, "fastgpt native attention: ", name, " must have no empty dimension", layout,
                  ", got shape ", t.sizes());
    }
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "fastgpt native attention: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  const int64_t head_dim_dim = dims - 1;  // heads are dim 1 in both layouts, head_dim the last
  if (packed) {
    TORCH_CHECK(k.size(2) == q.size(2), "fastgpt native attention: k must have shape (total_k, kv_heads, head_dim=",
                q.size(2), ") to match q, got ", k.sizes());
  } else {
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "fastgpt native attention: k must have shape (batch=",
                q.size(0), ", kv_heads, seq_k, head_dim=", q.size(3), ") to match q, got ", k.sizes());
  }
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "fastgpt native attention: q's heads (", q.size(1),
              ") must be a multiple of k's kv_heads (", k.size(1), ")");
  TORCH_CHECK(q.size(head_dim_dim) <= kAttentionMaxHeadDim, "fastgpt native attention: head_dim must be at most ",
              kAttentionMaxHeadDim, ", got ", q.size(head_dim_dim));
}

Variants checked_variants(bool causal, int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "fastgpt native attention: window sizes must be >= -1 (-1: unbounded), got (", window_left, ", ",
              window_right, ")");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "fastgpt native attention: softcap must be a finite float >= 0, got ",
              softcap);
  return {causal, window_left, window_right, static_cast<float>(softcap)};
}

std::vector<Sequence> dense_sequences(const at::Tensor& q, const at::Tensor& k) {
  std::vector<Sequence> sequences;
  for (int64_t b = 0; b < q.size(0); ++b) sequences.push_back({b, 0, q.size(2), 0, k.size(2)});
  return sequences;
}

std::vector<Sequence> packed_sequences(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total_q,
                                       int64_t total_k) {
  for (const auto& [cu, name] :
       {std::pair<const at::Tensor&, const char*>{cu_seqlens_q, "cu_seqlens_q"}, {cu_seqlens_k, "cu_seqlens_k"}}) {
    TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 2,
                "fastgpt native varlen attention: ", name, " must be a 1-dimensional int32 CPU tensor of batch + 1 >= 2 "
                "offsets, got ", cu.scalar_type(), " ", cu.sizes(), " on ", cu.device());
  }
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel(), "fastgpt native varlen attention: cu_seqlens_k must have as "
              "many offsets as cu_seqlens_q (", cu_seqlens_q.numel(), "), got ", cu_seqlens_k.numel());
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  const int32_t *offsets_q = cq.const_data_ptr<int32_t>(), *offsets_k = ck.const_data_ptr<int32_t>();
  const int64_t batch = cq.numel() - 1;
  TORCH_CHECK(offsets_q[0] == 0 && offsets_k[0] == 0 && offsets_q[batch] == total_q && offsets_k[batch] == total_k,
              "fastgpt native varlen attention: cu_seqlens_q and cu_seqlens_k must run from 0 to the rows of q (",
              total_q, ") and of k (", total_k, "), got ", offsets_q[0], "..", offsets_q[batch], " and ", offsets_k[0],
              "..", offsets_k[batch]);
  std::vector<Sequence> sequences;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t seq_q = offsets_q[b + 1] - offsets_q[b], seq_k = offsets_k[b + 1] - offsets_k[b];
    TORCH_CHECK(seq_q >= 0 && seq_k >= 0, "fastgpt native varlen attention: cu_seqlens must not decrease, got a "
                "negative length at sequence ", b);
    sequences.push_back({0, offsets_q[b], seq_q, offsets_k[b], seq_k});
  }
  return sequences;
}

// (batch, heads, rows, head_dim) view of a packed (total, heads, head_dim) tensor
at::Tensor heads_view(const at::Tensor& packed) { return packed.transpose(0, 1).unsqueeze(0); }

// K and V of every (sequence, kv_head) of a bf16 call, laid out once for gemm_bf16_pairs (every query
// block of the sequence's heads then multiplies them as they are): K^T in pairs of head dims, the b of
// the scores (head_dim / 2 rows of keys_padded pairs), and V in pairs of keys, the b of the output
// (keys_padded / 2 rows of head_dim pairs). keys_padded is the sequence's keys rounded up to even,
// the padding key zero; the pairs of V start at the sequence's first key.
class PairedKV {
 public:
  PairedKV(const at::Tensor& k, const at::Tensor& v, const std::vector<Sequence>& sequences)
      : kv_heads_(k.size(1)), head_dim_(k.size(3)) {
    int64_t total = 0;
    for (const Sequence& seq : sequences) {
      offsets_.push_back(total);
      total += kv_heads_ * 2 * padded(seq.seq_k) * head_dim_;
    }
    storage_.reset(new c10::BFloat16[total]);  // every element is written below
    const Heads k_heads(k), v_heads(v);
    const int64_t units = static_cast<int64_t>(sequences.size()) * kv_heads_;
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const Sequence& seq = sequences[unit / kv_heads_];
        const int64_t kvh = unit % kv_heads_;
        lay_out(k_heads, v_heads, seq, kvh, const_cast<c10::BFloat16*>(keys(unit / kv_heads_, kvh, seq)));
      }
    });
  }

  // K^T of (sequence, kv_head) from key 0, row stride keys_ld(seq) elements
  const c10::BFloat16* keys(int64_t sequence, int64_t kvh, const Sequence& seq) const {
    return storage_.get() + offsets_[sequence] + kvh * 2 * padded(seq.seq_k) * head_dim_;
  }
  static int64_t keys_ld(const Sequence& seq) { return 2 * padded(seq.seq_k); }

  // V of (sequence, kv_head) from key 0 (pairs: start at an even key), row stride values_ld()
  const c10::BFloat16* values(int64_t sequence, int64_t kvh, const Sequence& seq) const {
    return keys(sequence, kvh, seq) + padded(seq.seq_k) * head_dim_;
  }
  int64_t values_ld() const { return 2 * head_dim_; }

 private:
  static int64_t padded(int64_t keys) { return keys + keys % 2; }


  void lay_out(const Heads& k_heads, const Heads& v_heads, const Sequence& seq, int64_t kvh,
               c10::BFloat16* out) const {
    const int64_t keys = seq.seq_k, keys_padded = padded(keys), half_dim = head_dim_ / 2;
    uint32_t* k_pairs = reinterpret_cast<uint32_t*>(out);  // half_dim rows of keys_padded pairs
    uint32_t* v_pairs = k_pairs + keys_padded * half_dim;  // keys_padded / 2 rows of head_dim pairs
    std::vector<uint16_t> v_row(head_dim_), next_v_row(head_dim_);
    // one key's elements, contiguous (zeros past the last key)
    auto read = [&](const Heads& heads, int64_t key, uint16_t* row) {
      if (key >= keys) return std::fill(row, row + head_dim_, uint16_t{0});
      const auto* src = reinterpret_cast<const uint16_t*>(heads.row(seq.batch, kvh, seq.k_start + key));
      if (heads.stride_dim == 1) return static_cast<void>(std::memcpy(row, src, head_dim_ * sizeof(uint16_t)));
      for (int64_t d = 0; d < head_dim_; ++d) row[d] = src[d * heads.stride_dim];
    };
    // K^T: 16 keys at a time, so that each row of pairs is written 64 bytes at a time
    constexpr int64_t kKeys = 16;
    std::vector<uint32_t> k_block(kKeys * half_dim);
    for (int64_t first = 0; first < keys_padded; first += kKeys) {
      const int64_t count = std::min(kKeys, keys_padded - first);
      for (int64_t j = 0; j < count; ++j) read(k_heads, first + j, reinterpret_cast<uint16_t*>(&k_block[j * half_dim]));
      for (int64_t i = 0; i < half_dim; ++i) {
        uint32_t* row = k_pairs + i * keys_padded + first;
        for (int64_t j = 0; j < count; ++j) row[j] = k_block[j * half_dim + i];
      }
    }
    for (int64_t key = 0; key < keys_padded; key += 2) {
      read(v_heads, key, v_row.data());
      read(v_heads, key + 1, next_v_row.data());
      uint32_t* v_out = v_pairs + (key / 2) * head_dim_;
      for (int64_t d = 0; d < head_dim_; ++d) v_out[d] = v_row[d] | uint32_t{next_v_row[d]} << 16;
    }
  }

  int64_t kv_heads_, head_dim_;
  std::vector<int64_t> offsets_;
  std::unique_ptr<c10::BFloat16[]> storage_;
};

// The forward with tiles of Elem (fp32, or bf16 for bf16 inputs where the CPU multiplies bf16) on
// (batch, heads, rows, head_dim) views: writes the rows of `out` (same layout, unit inner stride)
// and lse[(batch * heads + head) * rows + row] of every query row of the sequences.
// With `paired` (bf16 tiles, AVX512-BF16 without AMX, an even head_dim), K and V are laid out once
// (PairedKV) and the products run on gemm_bf16_pairs; else on gemm().
template <typename Elem>
void attention_forward_tiles(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::vector<Sequence>& sequences, const Variants& variants, double scale,
                             const at::Tensor& out, float* lse_out, const PairedKV* paired = nullptr) {
  const int64_t heads = q.size(1), rows_q = q.size(2), head_dim = q.size(3);
  const int64_t group = heads / k.size(1);
  const Heads q_heads(q), k_heads(k), v_heads(v);
  const Rows<char> out_rows = output_rows(out);

  // work items (sequence, head, query block), in that order with the last query blocks (which see
  // the most keys under a causal mask) first: a thread taking consecutive items reuses the K/V rows
  // of one head from its cache, and the dynamic task loop ends with small items
  struct Item {
    int64_t sequence, head, first_query, block_q;
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < static_cast<int64_t>(sequences.size()); ++s) {
    const int64_t query_blocks = (sequences[s].seq_q + kForwardBlockQ - 1) / kForwardBlockQ;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t block = query_blocks - 1; block >= 0; --block) {
        const int64_t first_query = block * kForwardBlockQ;
        items.push_back({s, h, first_query, std::min(kForwardBlockQ, sequences[s].seq_q - first_query)});
      }
    }
  }

  const int64_t tasks = static_cast<int64_t>(items.size());
  run_tasks_dynamically(tasks, [&](const auto& next_task) {
    std::vector<Elem> q_tile(kForwardBlockQ * head_dim), k_tile(kForwardBlockK * head_dim),
        v_tile(kForwardBlockK * head_dim);
    std::vector<float> scores(kForwardBlockQ * kForwardBlockK), acc(kForwardBlockQ * head_dim),
        row_max(kForwardBlockQ), row_sum(kForwardBlockQ);
    // the probabilities as the output product's a: row stride probs_ld, with room for a zero before
    // and after a band (its keys start at an even key and count an even number for the pairs of V)
    const int64_t probs_ld = kForwardBlockK + 2;
    std::vector<Elem> probs = operand_buffer<Elem>(kForwardBlockQ * probs_ld);
    for (int64_t task = next_task(); task < tasks; task = next_task()) {
      const Item& item = items[task];
      const int64_t h = item.head, first_query = item.first_query, block_q = item.block_q;
      const Sequence& seq = sequences[item.sequence];
      const Mask mask = variants.mask(seq);
      // keys outside what the block's rows see are never loaded
      const int64_t key_begin = mask.keys_of(first_query).begin, key_end = mask.keys_of(first_query + block_q - 1).end;

      const Tile<Elem> q_rows = q_heads.tile(seq.batch, h, seq.q_start + first_query, block_q, head_dim, q_tile.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);

      for (int64_t first_key = key_begin; first_key < key_end; first_key += kForwardBlockK) {
        const int64_t block_k = std::min(kForwardBlockK, key_end - first_key);
        const int64_t key_row = seq.k_start + first_key;
        Tile<Elem> k_rows{}, v_rows{};
        if (paired == nullptr) {
          k_rows = k_heads.tile(seq.batch, h / group, key_row, block_k, head_dim, k_tile.data());
          v_rows = v_heads.tile(seq.batch, h / group, key_row, block_k, head_dim, v_tile.data());
        }
        for_row_bands(mask, first_query, block_q, first_key, block_k,
                      [&](int64_t first_row, int64_t end_row, int64_t begin, int64_t end) {
          const int64_t band_rows = end_row - first_row, band_keys = end - begin;
          float* band_scores = &scores[first_row * block_k + begin];
          if constexpr (std::is_same_v<Elem, c10::BFloat16>) {
            if (paired != nullptr) {
              gemm_bf16_pairs(band_rows, band_keys, head_dim / 2, static_cast<float>(scale), q_rows.row(first_row),
                              q_rows.ld, paired->keys(item.sequence, h / group, seq) + 2 * (first_key + begin),
                              PairedKV::keys_ld(seq), /*accumulate=*/false, band_scores, block_k);
            }
          }
          if (paired == nullptr) {
            gemm(Transpose::no, Transpose::yes, band_rows, band_keys, head_dim, static_cast<float>(scale),
                 q_rows.row(first_row), q_rows.ld, k_rows.row(begin), k_rows.ld, 0.f, band_scores, block_k);
          }

          // online softmax: scores -> unnormalized probabilities (0 outside the keys the row sees);
          // rescale what was accumulated. new_row_max: the running max with the row's visible scores
          // (soft-capped first), what the row accumulated rescaled to it
          auto new_row_max = [&](int64_t r, float* visible, int64_t count) {
            if (variants.softcap > 0.f) softcap_in_place(visible, count, 1.f, variants.softcap, nullptr);
            const float new_max = std::max(row_max[r], max_of(visible, count));
            const float rescale = std::exp(row_max[r] - new_max);  // 0 while the row had no key yet
            row_sum[r] *= rescale;
            row_max[r] = new_max;
            if (rescale != 1.f) scale_in_place(&acc[r * head_dim], head_dim, rescale);
            return new_max;
          };
          if constexpr (std::is_same_v<Elem, c10::BFloat16>) {
            if (paired != nullptr) {
              // the probabilities go straight to bf16, from the even key at or before the band's first to
              // an even count (pairs of V), zeros around the keys each row sees
              const int64_t lead = (first_key + begin) % 2, count = lead + band_keys, pairs = (count + 1) / 2;
              for (int64_t r = first_row; r < end_row; ++r) {
                c10::BFloat16* band_row = &probs[r * probs_ld + lead];  // key `begin` of the block
                const KeyRange seen = row_keys(mask, first_query + r, first_key, begin, end);
                probs[r * probs_ld] = probs[r * probs_ld + count] = c10::BFloat16(0.f);
                std::fill(band_row, band_row + (seen.begin - begin), c10::BFloat16(0.f));
                std::fill(band_row + (seen.end - begin), band_row + band_keys, c10::BFloat16(0.f));
                const int64_t seen_keys = seen.end - seen.begin;
                if (seen_keys == 0) continue;
                float* visible = &scores[r * block_k + seen.begin];
                const float shift = new_row_max(r, visible, seen_keys);
                row_sum[r] += exp_to_bf16(visible, seen_keys, shift, band_row + (seen.begin - begin));
              }
              gemm_bf16_pairs(band_rows, head_dim, pairs, 1.f, &probs[first_row * probs_ld], probs_ld,
                              paired->values(item.sequence, h / group, seq) + (first_key + begin - lead) * head_dim,
                              paired->values_ld(), /*accumulate=*/true, &acc[first_row * head_dim], head_dim);
              return;
            }
          }
          for (int64_t r = first_row; r < end_row; ++r) {
            float* row = &scores[r * block_k];
            const KeyRange seen = row_keys(mask, first_query + r, first_key, begin, end);
            std::fill(row + begin, row + seen.begin, 0.f);
            std::fill(row + seen.end, row + end, 0.f);
            const int64_t count = seen.end - seen.begin;
            if (count == 0) continue;
            float* visible = row + seen.begin;
            const float shift = new_row_max(r, visible, count);
            row_sum[r] += exp_in_place(visible, count, 1.f, shift);
          }
          const Elem* band_probs =
              as_operand(band_scores, band_rows, band_keys, block_k, probs.data(), first_row * block_k + begin);
          gemm(Transpose::no, Transpose::no, band_rows, head_dim, band_keys, 1.f, band_probs, block_k,
               v_rows.row(begin), v_rows.ld, 1.f, &acc[first_row * head_dim], head_dim);
        });
      }

      // normalize; a row that saw no key gives o = 0 (written, not scaled: its zero probabilities
      // times a NaN in v are NaN) and lse = -inf; a NaN row_sum (NaN scores) stays NaN
      for (int64_t r = 0; r < block_q; ++r) {
        float* row = &acc[r * head_dim];
        if (row_sum[r] == 0.f) {
          std::fill(row, row + head_dim, 0.f);
        } else {
          scale_in_place(row, head_dim, 1.f / row_sum[r]);
        }
        const int64_t query_row = seq.q_start + first_query + r;
        store_row(row, head_dim, out.scalar_type(), out_rows.row(seq.batch, h, query_row));
        lse_out[(seq.batch * heads + h) * rows_q + query_row] =
            row_sum[r] > 0.f ? row_max[r] + std::log(row_sum[r]) : kNegInf;
      }
    }
  });
}

void forward_tiles(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::vector<Sequence>& sequences, const Variants& variants, double scale,
                   const at::Tensor& out, float* lse_out) {
  if (q.scalar_type() == at::kBFloat16 && bf16_pairs_available() && q.size(3) % 2 == 0) {
    const PairedKV paired(k, v, sequences);
    attention_forward_tiles<c10::BFloat16>(q, k, v, sequences, variants, scale, out, lse_out, &paired);
  } else if (bf16_products(q)) {
    attention_forward_tiles<c10::BFloat16>(q, k, v, sequences, variants, scale, out, lse_out);
  } else {
    attention_forward_tiles<float>(q, k, v, sequences, variants, scale, out, lse_out);
  }
}

// The backward with tiles of Elem, as the forward, on (batch, heads, rows, head_dim) views; writes
// every row of grad_q, grad_k and grad_v (views of contiguous outputs).
template <typename Elem>
void attention_backward_tiles(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const float* lse_in,
                              const std::vector<Sequence>& sequences, const Variants& variants, double scale,
                              const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const int64_t batch = q.size(0), heads = q.size(1), rows_q = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  const Heads q_heads(q), k_heads(k), v_heads(v), grad_out_heads(grad_out), out_heads(out);
  const Rows<char> grad_k_rows = output_rows(grad_k), grad_v_rows = output_rows(grad_v);
  const bool softcap = variants.softcap > 0.f;

  // delta = rowsum(dO * O) == rowsum(P * dP): the softmax backward's per-row correction
  std::vector<float> delta(batch * heads * rows_q);
  at::parallel_for(0, batch * heads * rows_q, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> grad_row(head_dim), out_row(head_dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows_q / heads, h = row / rows_q % heads, s = row % rows_q;
      delta[row] = dot(grad_out_heads.tile<float>(b, h, s, 1, head_dim, grad_row.data()).data,
                       out_heads.tile<float>(b, h, s, 1, head_dim, out_row.data()).data, head_dim);
    }
  });

  int64_t most_key_blocks = 1;
  for (const Sequence& seq : sequences) {
    most_key_blocks = std::max(most_key_blocks, (seq.seq_k + kBackwardBlockK - 1) / kBackwardBlockK);
  }
  const int64_t units = std::max<int64_t>(1, static_cast<int64_t>(sequences.size()) * kv_heads);
  const int64_t splits = std::clamp<int64_t>((kMinBackwardTasks + units - 1) / units, 1, most_key_blocks);
  // dQ is accumulated in fp32, one partial sum per split of the key blocks: (splits, batch, heads,
  // rows, head_dim). With one split and fp32 q, the partial is grad_q itself.
  const bool grad_q_in_place = splits == 1 && q.scalar_type() == at::kFloat;
  at::Tensor grad_q_partial;
  Rows<float> grad_q_acc;
  int64_t split_stride = 0;
  if (grad_q_in_place) {
    grad_q.zero_();
    grad_q_acc = float_rows(grad_q.data_ptr<float>(), grad_q);
  } else {
    grad_q_partial = at::zeros({splits, batch, heads, rows_q, head_dim}, q.options().dtype(at::kFloat));
    grad_q_acc = float_rows(grad_q_partial.data_ptr<float>(), grad_q_partial[0]);
    split_stride = grad_q_partial.stride(0);
  }

  const int64_t tasks = static_cast<int64_t>(sequences.size()) * kv_heads * splits;
  run_tasks_dynamically(tasks, [&](const auto& next_task) {
    std::vector<Elem> k_tile(kBackwardBlockK * head_dim), v_tile(kBackwardBlockK * head_dim),
        q_tile(kBackwardBlockQ * head_dim), grad_out_tile(kBackwardBlockQ * head_dim);
    std::vector<float> grad_k_acc(kBackwardBlockK * head_dim), grad_v_acc(kBackwardBlockK * head_dim),
        probs(kBackwardBlockQ * kBackwardBlockK), grad_scores(kBackwardBlockQ * kBackwardBlockK),
        cap_derivative(softcap ? kBackwardBlockQ * kBackwardBlockK : 0);
    std::vector<KeyRange> seen_keys(kBackwardBlockQ);
    std::vector<Elem> probs_operand = operand_buffer<Elem>(kBackwardBlockQ * kBackwardBlockK),
                      grad_scores_operand = operand_buffer<Elem>(kBackwardBlockQ * kBackwardBlockK);
    for (int64_t task = next_task(); task < tasks; task = next_task()) {
      const int64_t split = task % splits, kvh = task / splits % kv_heads;
      const Sequence& seq = sequences[task / (splits * kv_heads)];
      const Mask mask = variants.mask(seq);
      const int64_t key_blocks = (seq.seq_k + kBackwardBlockK - 1) / kBackwardBlockK;
      const int64_t key_blocks_per_split = (key_blocks + splits - 1) / splits;
      const int64_t block_end = std::min(key_blocks, (split + 1) * key_blocks_per_split);
      const Rows<float> grad_q_split = {grad_q_acc.data + split * split_stride, grad_q_acc.stride_batch,
                                        grad_q_acc.stride_head, grad_q_acc.stride_seq};
      for (int64_t key_block = split * key_blocks_per_split; key_block < block_end; ++key_block) {
        const int64_t first_key = key_block * kBackwardBlockK;
        const int64_t block_k = std::min(kBackwardBlockK, seq.seq_k - first_key);
        const int64_t key_row = seq.k_start + first_key;
        const Tile<Elem> k_rows = k_heads.tile(seq.batch, kvh, key_row, block_k, head_dim, k_tile.data());
        const Tile<Elem> v_rows = v_heads.tile(seq.batch, kvh, key_row, block_k, head_dim, v_tile.data());
        std::fill(grad_k_acc.begin(), grad_k_acc.end(), 0.f);
        std::fill(grad_v_acc.begin(), grad_v_acc.end(), 0.f);
        // only these queries see keys of the block
        const KeyRange queries = mask.queries_seeing(first_key, first_key + block_k);

        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          for (int64_t first_query = queries.begin; first_query < queries.end; first_query += kBackwardBlockQ) {
            const int64_t block_q = std::min(kBackwardBlockQ, queries.end - first_query);
            const int64_t query_row = seq.q_start + first_query;
            const int64_t row0 = (seq.batch * heads + h) * rows_q + query_row;
            const Tile<Elem> q_rows = q_heads.tile(seq.batch, h, query_row, block_q, head_dim, q_tile.data());
            const Tile<Elem> grad_out_rows =
                grad_out_heads.tile(seq.batch, h, query_row, block_q, head_dim, grad_out_tile.data());
            float* grad_q_rows = grad_q_split.row(seq.batch, h, query_row);

            for_row_bands(mask, first_query, block_q, first_key, block_k,
                          [&](int64_t first_row, int64_t end_row, int64_t begin, int64_t end) {
              const int64_t band_rows = end_row - first_row, band_keys = end - begin;
              const int64_t band_offset = first_row * block_k + begin;
              float* band_probs = &probs[band_offset];
              float* band_grad_scores = &grad_scores[band_offset];
              const Elem* band_q = q_rows.row(first_row);
              const Elem* band_grad_out = grad_out_rows.row(first_row);

              // P = exp(cap(scale * Q K^T) - lse), zero where masked or where the row sees no key
              gemm(Transpose::no, Transpose::yes, band_rows, band_keys, head_dim, 1.f, band_q, q_rows.ld,
                   k_rows.row(begin), k_rows.ld, 0.f, band_probs, block_k);
              for (int64_t r = first_row; r < end_row; ++r) {
                float* row = &probs[r * block_k];
                const float row_lse = lse_in[row0 + r];
                KeyRange seen = row_keys(mask, first_query + r, first_key, begin, end);
                if (row_lse == kNegInf) seen.end = seen.begin;
                seen_keys[r] = seen;
                std::fill(row + begin, row + seen.begin, 0.f);
                std::fill(row + seen.end, row + end, 0.f);
                const int64_t count = seen.end - seen.begin;
                if (count == 0) continue;
                if (softcap) {
                  softcap_in_place(row + seen.begin, count, static_cast<float>(scale), variants.softcap,
                                   &cap_derivative[r * block_k + seen.begin]);
                  exp_in_place(row + seen.begin, count, 1.f, row_lse);
                } else {
                  exp_in_place(row + seen.begin, count, static_cast<float>(scale), row_lse);
                }
              }
              // dV += P^T dO
              const Elem* band_probs_operand =
                  as_operand(band_probs, band_rows, band_keys, block_k, probs_operand.data(), band_offset);
              gemm(Transpose::yes, Transpose::no, band_keys, head_dim, band_rows, 1.f, band_probs_operand, block_k,
                   band_grad_out, grad_out_rows.ld, 1.f, &grad_v_acc[begin * head_dim], head_dim);
              // dP = dO V^T
              gemm(Transpose::no, Transpose::yes, band_rows, band_keys, head_dim, 1.f, band_grad_out,
                   grad_out_rows.ld, v_rows.row(begin), v_rows.ld, 0.f, band_grad_scores, block_k);
              for (int64_t r = first_row; r < end_row; ++r) {  // dS = P * (dP - delta), times the cap's derivative
                softmax_backward_in_place(&grad_scores[r * block_k + begin], &probs[r * block_k + begin], band_keys,
                                          delta[row0 + r]);
                const KeyRange seen = seen_keys[r];
                if (softcap && seen.end > seen.begin) {
                  multiply_in_place(&grad_scores[r * block_k + seen.begin], &cap_derivative[r * block_k + seen.begin],
                                    seen.end - seen.begin);
                }
              }
              const Elem* band_grad_scores_operand = as_operand(band_grad_scores, band_rows, band_keys, block_k,
                                                                grad_scores_operand.data(), band_offset);
              // dK += scale dS^T Q
              gemm(Transpose::yes, Transpose::no, band_keys, head_dim, band_rows, static_cast<float>(scale),
                   band_grad_scores_operand, block_k, band_q, q_rows.ld, 1.f, &grad_k_acc[begin * head_dim], head_dim);
              // dQ += scale dS K
              gemm(Transpose::no, Transpose::no, band_rows, head_dim, band_keys, static_cast<float>(scale),
                   band_grad_scores_operand, block_k, k_rows.row(begin), k_rows.ld, 1.f,
                   grad_q_rows + first_row * grad_q_split.stride_seq, grad_q_split.stride_seq);
            });
          }
        }
        for (int64_t r = 0; r < block_k; ++r) {
          store_row(&grad_k_acc[r * head_dim], head_dim, k.scalar_type(), grad_k_rows.row(seq.batch, kvh, key_row + r));
          store_row(&grad_v_acc[r * head_dim], head_dim, v.scalar_type(), grad_v_rows.row(seq.batch, kvh, key_row + r));
        }
      }
    }
  });
  if (grad_q_in_place) return;

  // dQ = the split partials summed in split order, in q's dtype
  const Rows<char> grad_q_rows = output_rows(grad_q);
  at::parallel_for(0, batch * heads * rows_q, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> total(head_dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows_q / heads, h = row / rows_q % heads, s = row % rows_q;
      const float* first = grad_q_acc.row(b, h, s);
      std::memcpy(total.data(), first, head_dim * sizeof(float));
      for (int64_t split = 1; split < splits; ++split) {
        const float* partial = first + split * split_stride;
        for (int64_t c = 0; c < head_dim; ++c) total[c] += partial[c];
      }
      store_row(total.data(), head_dim, q.scalar_type(), grad_q_rows.row(b, h, s));
    }
  });
}

void backward_tiles(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const float* lse_in, const std::vector<Sequence>& sequences,
                    const Variants& variants, double scale, const at::Tensor& grad_q, const at::Tensor& grad_k,
                    const at::Tensor& grad_v) {
  if (bf16_products(q)) {
    attention_backward_tiles<c10::BFloat16>(grad_out, q, k, v, out, lse_in, sequences, variants, scale, grad_q,
                                            grad_k, grad_v);
  } else {
    attention_backward_tiles<float>(grad_out, q, k, v, out, lse_in, sequences, variants, scale, grad_q, grad_k,
                                    grad_v);
  }
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                           const at::Tensor& lse, at::IntArrayRef lse_shape) {
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type(),
                "fastgpt native attention_backward: ", name, " must be a CPU tensor with the shape ", q.sizes(),
                " and dtype ", q.scalar_type(), " of q, got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape,
              "fastgpt native attention_backward: lse must be a float32 CPU tensor of shape ", lse_shape, ", got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
}

at::Tensor contiguous_output(at::IntArrayRef sizes, const at::Tensor& like) {
  return alloc_output(sizes, like.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale, int64_t window_left,
                                                     int64_t window_right, double softcap) {
  check_attention_inputs(q, k, v);
  const Variants variants = checked_variants(causal, window_left, window_right, softcap);
  at::Tensor out = contiguous_output(q.sizes(), q);
  at::Tensor lse = alloc_output(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));
  if (variants.plain() && use_decode_kernel(q, k)) {  // the decode kernel has no window or soft cap
    attention_decode_forward(q, k, v, causal, scale, out, lse);
  } else {
    forward_tiles(q, k, v, dense_sequences(q, k), variants, scale, out, lse.data_ptr<float>());
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale, int64_t window_left,
                                                                  int64_t window_right, double softcap) {
  check_attention_inputs(q, k, v);
  check_backward_inputs(grad_out, q, out, lse, q.sizes().slice(0, 3));
  const Variants variants = checked_variants(causal, window_left, window_right, softcap);
  const at::Tensor lse_values = lse.contiguous();
  at::Tensor grad_q = contiguous_output(q.sizes(), q), grad_k = contiguous_output(k.sizes(), k),
             grad_v = contiguous_output(v.sizes(), v);
  backward_tiles(grad_out, q, k, v, out, lse_values.const_data_ptr<float>(), dense_sequences(q, k), variants, scale,
                 grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, bool causal, double scale,
                                                            int64_t window_left, int64_t window_right,
                                                            double softcap) {
  check_attention_inputs(q, k, v, /*packed=*/true);
  const Variants variants = checked_variants(causal, window_left, window_right, softcap);
  const std::vector<Sequence> sequences = packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0));
  at::Tensor out = contiguous_output(q.sizes(), q);
  at::Tensor lse = alloc_output({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  // rows of sequences without keys are written by their (empty) query blocks like any blind row
  forward_tiles(heads_view(q), heads_view(k), heads_view(v), sequences, variants, scale, heads_view(out),
                lse.data_ptr<float>());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, bool causal, double scale,
    int64_t window_left, int64_t window_right, double softcap) {
  check_attention_inputs(q, k, v, /*packed=*/true);
  check_backward_inputs(grad_out, q, out, lse, {q.size(1), q.size(0)});
  const Variants variants = checked_variants(causal, window_left, window_right, softcap);
  const std::vector<Sequence> sequences = packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0));
  const at::Tensor lse_values = lse.contiguous();
  at::Tensor grad_q = contiguous_output(q.sizes(), q), grad_k = contiguous_output(k.sizes(), k),
             grad_v = contiguous_output(v.sizes(), v);
  backward_tiles(heads_view(grad_out), heads_view(q), heads_view(k), heads_view(v), heads_view(out),
                 lse_values.const_data_ptr<float>(), sequences, variants, scale, heads_view(grad_q), heads_view(grad_k),
                 heads_view(grad_v));
  return {grad_q, grad_k, grad_v};
}

}  // namespace fastgpt::cpu
