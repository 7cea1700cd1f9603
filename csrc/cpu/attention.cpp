// Flash-style attention on the CPU: forward and backward, fp32 accumulation, O(seq) memory.
//
// Queries are processed in blocks against blocks of keys with an online softmax, so no
// seq_q x seq_k matrix ever exists: per thread there is one block of scores. Tiles of q/k/v
// (any strides, fp32/fp16/bf16) are converted to dense fp32 on load (fp32 tiles with a unit
// inner stride are used in place). The tile products go to torch's BLAS (MKL on x86-64) through
// gemm.h. bf16 inputs, on a CPU with bf16 units (AMX, AVX512-BF16), keep bf16 tiles and
// multiply them in bf16 with fp32 accumulation, rounding the fp32 probabilities and score gradients
// to bf16 on the way into their products as FlashAttention does on GPUs: about 1.4x faster forward
// and 1.6x forward+backward than fp32 tiles at (4, 8, 1024, 64) here. Measured on one core for a
// 128x128x64 tile product: MKL 132 GFLOP/s against 108 for a register-blocked 4x32 AVX-512
// micro-kernel (144 vs 82 at 128x512x64); at::vec::Vectorized is scalar code in this
// baseline-x86-64 build. exp() and the other row loops are vector code compiled for several ISAs
// (simd.h).
//
// Under a causal mask, the rows of a block that see only part of a key block are multiplied in
// bands of kBandRows rows, each against only the keys its last row sees, so most of the masked
// corner of a diagonal block is never computed (at 1024 keys in blocks of 128, 8% of all products).
//
// Parallelism, with tasks handed out dynamically: the forward over batch x heads x query
// blocks; the backward over batch x kv_heads x (a fixed number of splits of the key blocks).
// A backward task owns dK/dV of its key blocks and accumulates dQ into the fp32 partial buffer
// of its split (with one split and fp32 q, into dQ itself); the partials are summed in split
// order. Nothing depends on the thread count, so the results are deterministic.
#include <algorithm>
#include <cmath>
#include <cstring>
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
// rows per band where a causal mask cuts a block (see the top of the file)
constexpr int64_t kBandRows = 32;
// the backward splits the key blocks of each (batch, kv_head) until there are this many tasks
constexpr int64_t kMinBackwardTasks = 16;

// grad[j] = probs[j] * (grad[j] - delta): the softmax backward, dS = P * (dP - rowsum(dO * O))
FASTGPT_CPU_DISPATCH void softmax_backward_in_place(float* grad, const float* probs, int64_t n, float delta) {
  for_lanes(n, [&](int64_t j, int64_t count) {
    store_lanes(grad + j, load_lanes(probs + j, count) * (load_lanes(grad + j, count) - delta), count);
  });
}

FASTGPT_CPU_DISPATCH float dot(const float* a, const float* b, int64_t n) {
  Floats sums{};
  for_lanes(n, [&](int64_t j, int64_t count) { sums += load_lanes(a + j, count) * load_lanes(b + j, count); });
  return sum_lanes(sums);
}

// Calls body(first_row, end_row, keys) for bands of rows of a query block (block_q rows from
// first_query) against a key block (block_k keys from first_key), such that every row of a band sees
// at most its first `keys` keys. Rows that see the whole block form one band; rows that see only part
// of it (the causal diagonal) are taken kBandRows at a time, each band against the keys its last row
// sees. Bands whose rows see no key are skipped.
template <typename Body>
void for_row_bands(bool causal, int64_t first_query, int64_t block_q, int64_t first_key, int64_t block_k,
                   int64_t seq_q, int64_t seq_k, Body&& body) {
  for (int64_t first_row = 0; first_row < block_q; first_row += kBandRows) {
    const int64_t end_row = std::min(first_row + kBandRows, block_q);
    const int64_t keys = visible_keys(causal, first_query + end_row - 1, first_key, block_k, seq_q, seq_k);
    if (keys == block_k) {  // visibility only grows down the block: every later row sees every key
      body(first_row, block_q, block_k);
      return;
    }
    if (keys > 0) body(first_row, end_row, keys);
  }
}

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    TORCH_CHECK(t.device().is_cpu(), "fastgpt native attention (CPU): ", name, " must be a CPU tensor, got ",
                t.device());
    TORCH_CHECK(t.dim() == 4, "fastgpt native attention: ", name,
                " must be 4-dimensional (batch, heads, seq, head_dim), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                "fastgpt native attention: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "fastgpt native attention: ", name, " must have the dtype of q (",
                q.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.numel() > 0, "fastgpt native attention: ", name, " must have no empty dimension, got shape ",
                t.sizes());
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "fastgpt native attention: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "fastgpt native attention: k must have shape (batch=",
              q.size(0), ", kv_heads, seq_k, head_dim=", q.size(3), ") to match q, got ", k.sizes());
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "fastgpt native attention: q's heads (", q.size(1),
              ") must be a multiple of k's kv_heads (", k.size(1), ")");
  TORCH_CHECK(q.size(3) <= kAttentionMaxHeadDim, "fastgpt native attention: head_dim must be at most ",
              kAttentionMaxHeadDim, ", got ", q.size(3));
}

// The forward with tiles of Elem: fp32, or bf16 for bf16 inputs where the CPU multiplies bf16.
template <typename Elem>
void attention_forward_tiles(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                             double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = q.size(0), heads = q.size(1), seq_q = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(1), seq_k = k.size(2), group = heads / kv_heads;
  const Heads q_heads(q), k_heads(k), v_heads(v);
  const int64_t query_blocks = (seq_q + kForwardBlockQ - 1) / kForwardBlockQ;
  float* lse_out = lse.data_ptr<float>();

  const int64_t tasks = batch * heads * query_blocks;
  run_tasks_dynamically(tasks, [&](const auto& next_task) {
    std::vector<Elem> q_tile(kForwardBlockQ * head_dim), k_tile(kForwardBlockK * head_dim),
        v_tile(kForwardBlockK * head_dim);
    std::vector<float> scores(kForwardBlockQ * kForwardBlockK), acc(kForwardBlockQ * head_dim),
        row_max(kForwardBlockQ), row_sum(kForwardBlockQ);
    std::vector<Elem> probs = operand_buffer<Elem>(kForwardBlockQ * kForwardBlockK);
    for (int64_t task = next_task(); task < tasks; task = next_task()) {
      const int64_t b = task / (heads * query_blocks), h = task / query_blocks % heads;
      // the last query blocks see the most keys (causal): start with them, end with small tasks
      const int64_t first_query = (query_blocks - 1 - task % query_blocks) * kForwardBlockQ;
      const int64_t block_q = std::min(kForwardBlockQ, seq_q - first_query);
      // keys past what the block's last query sees are never loaded
      const int64_t key_end =
          causal ? std::clamp<int64_t>(first_query + block_q + seq_k - seq_q, 0, seq_k) : seq_k;

      const Tile<Elem> q_rows = q_heads.tile(b, h, first_query, block_q, head_dim, q_tile.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);

      for (int64_t first_key = 0; first_key < key_end; first_key += kForwardBlockK) {
        const int64_t block_k = std::min(kForwardBlockK, key_end - first_key);
        const Tile<Elem> k_rows = k_heads.tile(b, h / group, first_key, block_k, head_dim, k_tile.data());
        const Tile<Elem> v_rows = v_heads.tile(b, h / group, first_key, block_k, head_dim, v_tile.data());
        for_row_bands(causal, first_query, block_q, first_key, block_k, seq_q, seq_k,
                      [&](int64_t first_row, int64_t end_row, int64_t keys) {
          float* band_scores = &scores[first_row * block_k];
          gemm(Transpose::no, Transpose::yes, end_row - first_row, keys, head_dim, static_cast<float>(scale),
               q_rows.row(first_row), q_rows.ld, k_rows.data, k_rows.ld, 0.f, band_scores, block_k);

          // online softmax: scores -> unnormalized probabilities; rescale what was accumulated
          for (int64_t r = first_row; r < end_row; ++r) {
            float* row = &scores[r * block_k];
            const int64_t visible = visible_keys(causal, first_query + r, first_key, keys, seq_q, seq_k);
            std::fill(row + visible, row + keys, 0.f);
            if (visible == 0) continue;
            const float new_max = std::max(row_max[r], max_of(row, visible));
            const float rescale = std::exp(row_max[r] - new_max);  // 0 while the row had no key yet
            row_sum[r] = row_sum[r] * rescale + exp_in_place(row, visible, 1.f, new_max);
            row_max[r] = new_max;
            if (rescale != 1.f) scale_in_place(&acc[r * head_dim], head_dim, rescale);
          }
          const Elem* band_probs =
              as_operand(band_scores, end_row - first_row, keys, block_k, probs.data(), first_row * block_k);
          gemm(Transpose::no, Transpose::no, end_row - first_row, head_dim, keys, 1.f, band_probs, block_k,
               v_rows.data, v_rows.ld, 1.f, &acc[first_row * head_dim], head_dim);
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
        const int64_t out_row = (b * heads + h) * seq_q + first_query + r;
        store_row(row, head_dim, out.scalar_type(), mutable_element_ptr(out, out_row * head_dim));
        lse_out[out_row] = row_sum[r] > 0.f ? row_max[r] + std::log(row_sum[r]) : kNegInf;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale) {
  check_attention_inputs(q, k, v);
  at::Tensor out = alloc_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = alloc_output(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));
  if (use_decode_kernel(q, k)) {
    attention_decode_forward(q, k, v, causal, scale, out, lse);
  } else if (bf16_products(q)) {
    attention_forward_tiles<c10::BFloat16>(q, k, v, causal, scale, out, lse);
  } else {
    attention_forward_tiles<float>(q, k, v, causal, scale, out, lse);
  }
  return {out, lse};
}

namespace {

// The backward with tiles of Elem, as the forward.
template <typename Elem>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_tiles(const at::Tensor& grad_out,
                                                                        const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v, const at::Tensor& out,
                                                                        const at::Tensor& lse, bool causal,
                                                                        double scale) {
  const int64_t batch = q.size(0), heads = q.size(1), seq_q = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(1), seq_k = k.size(2), group = heads / kv_heads;
  const at::Tensor lse_values = lse.contiguous();
  const float* lse_in = lse_values.const_data_ptr<float>();
  const Heads q_heads(q), k_heads(k), v_heads(v), grad_out_heads(grad_out), out_heads(out);

  // delta = rowsum(dO * O) == rowsum(P * dP): the softmax backward's per-row correction
  std::vector<float> delta(batch * heads * seq_q);
  at::parallel_for(0, batch * heads * seq_q, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> grad_row(head_dim), out_row(head_dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / seq_q / heads, h = row / seq_q % heads, s = row % seq_q;
      delta[row] = dot(grad_out_heads.tile<float>(b, h, s, 1, head_dim, grad_row.data()).data,
                       out_heads.tile<float>(b, h, s, 1, head_dim, out_row.data()).data, head_dim);
    }
  });

  const int64_t key_blocks = (seq_k + kBackwardBlockK - 1) / kBackwardBlockK;
  const int64_t splits =
      std::clamp<int64_t>((kMinBackwardTasks + batch * kv_heads - 1) / (batch * kv_heads), 1, key_blocks);
  const int64_t key_blocks_per_split = (key_blocks + splits - 1) / splits;
  at::Tensor grad_q = alloc_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_k = alloc_output(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_v = alloc_output(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  // dQ is accumulated in fp32, one partial sum per split of the key blocks: (splits, batch, heads,
  // seq_q, head_dim). With one split and fp32 q, the partial is grad_q itself.
  const bool grad_q_in_place = splits == 1 && q.scalar_type() == at::kFloat;
  at::Tensor grad_q_partial = grad_q_in_place
                                  ? grad_q.zero_()
                                  : at::zeros({splits, batch, heads, seq_q, head_dim}, q.options().dtype(at::kFloat));
  float* grad_q_acc = grad_q_partial.data_ptr<float>();

  const int64_t tasks = batch * kv_heads * splits;
  run_tasks_dynamically(tasks, [&](const auto& next_task) {
    std::vector<Elem> k_tile(kBackwardBlockK * head_dim), v_tile(kBackwardBlockK * head_dim),
        q_tile(kBackwardBlockQ * head_dim), grad_out_tile(kBackwardBlockQ * head_dim);
    std::vector<float> grad_k_acc(kBackwardBlockK * head_dim), grad_v_acc(kBackwardBlockK * head_dim),
        probs(kBackwardBlockQ * kBackwardBlockK), grad_scores(kBackwardBlockQ * kBackwardBlockK);
    std::vector<Elem> probs_operand = operand_buffer<Elem>(kBackwardBlockQ * kBackwardBlockK),
                      grad_scores_operand = operand_buffer<Elem>(kBackwardBlockQ * kBackwardBlockK);
    for (int64_t task = next_task(); task < tasks; task = next_task()) {
      const int64_t b = task / (kv_heads * splits), kvh = task / splits % kv_heads, split = task % splits;
      const int64_t block_end = std::min(key_blocks, (split + 1) * key_blocks_per_split);
      for (int64_t key_block = split * key_blocks_per_split; key_block < block_end; ++key_block) {
        const int64_t first_key = key_block * kBackwardBlockK;
        const int64_t block_k = std::min(kBackwardBlockK, seq_k - first_key);
        const Tile<Elem> k_rows = k_heads.tile(b, kvh, first_key, block_k, head_dim, k_tile.data());
        const Tile<Elem> v_rows = v_heads.tile(b, kvh, first_key, block_k, head_dim, v_tile.data());
        std::fill(grad_k_acc.begin(), grad_k_acc.end(), 0.f);
        std::fill(grad_v_acc.begin(), grad_v_acc.end(), 0.f);
        // queries before this one see none of the block's keys
        const int64_t first_seeing = causal ? std::max<int64_t>(0, first_key - (seq_k - seq_q)) : 0;

        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          for (int64_t first_query = first_seeing / kBackwardBlockQ * kBackwardBlockQ; first_query < seq_q;
               first_query += kBackwardBlockQ) {
            const int64_t block_q = std::min(kBackwardBlockQ, seq_q - first_query);
            const int64_t row0 = (b * heads + h) * seq_q + first_query;
            const Tile<Elem> q_rows = q_heads.tile(b, h, first_query, block_q, head_dim, q_tile.data());
            const Tile<Elem> grad_out_rows =
                grad_out_heads.tile(b, h, first_query, block_q, head_dim, grad_out_tile.data());
            float* grad_q_rows = grad_q_acc + (split * batch * heads * seq_q + row0) * head_dim;

            for_row_bands(causal, first_query, block_q, first_key, block_k, seq_q, seq_k,
                          [&](int64_t first_row, int64_t end_row, int64_t keys) {
              const int64_t rows = end_row - first_row;
              float* band_probs = &probs[first_row * block_k];
              float* band_grad_scores = &grad_scores[first_row * block_k];
              const Elem* band_q = q_rows.row(first_row);
              const Elem* band_grad_out = grad_out_rows.row(first_row);

              // P = exp(scale * Q K^T - lse), zero where masked or where the row sees no key
              gemm(Transpose::no, Transpose::yes, rows, keys, head_dim, 1.f, band_q, q_rows.ld, k_rows.data,
                   k_rows.ld, 0.f, band_probs, block_k);
              for (int64_t r = first_row; r < end_row; ++r) {
                float* row = &probs[r * block_k];
                const int64_t visible = visible_keys(causal, first_query + r, first_key, keys, seq_q, seq_k);
                const float row_lse = lse_in[row0 + r];
                const int64_t kept = row_lse == kNegInf ? 0 : visible;
                std::fill(row + kept, row + keys, 0.f);
                if (kept > 0) exp_in_place(row, kept, static_cast<float>(scale), row_lse);
              }
              // dV += P^T dO
              const Elem* band_probs_operand =
                  as_operand(band_probs, rows, keys, block_k, probs_operand.data(), first_row * block_k);
              gemm(Transpose::yes, Transpose::no, keys, head_dim, rows, 1.f, band_probs_operand, block_k,
                   band_grad_out, grad_out_rows.ld, 1.f, grad_v_acc.data(), head_dim);
              // dP = dO V^T
              gemm(Transpose::no, Transpose::yes, rows, keys, head_dim, 1.f, band_grad_out, grad_out_rows.ld,
                   v_rows.data, v_rows.ld, 0.f, band_grad_scores, block_k);
              for (int64_t r = first_row; r < end_row; ++r) {  // dS = P * (dP - delta)
                softmax_backward_in_place(&grad_scores[r * block_k], &probs[r * block_k], keys, delta[row0 + r]);
              }
              const Elem* band_grad_scores_operand = as_operand(band_grad_scores, rows, keys, block_k,
                                                                grad_scores_operand.data(), first_row * block_k);
              // dK += scale dS^T Q
              gemm(Transpose::yes, Transpose::no, keys, head_dim, rows, static_cast<float>(scale),
                   band_grad_scores_operand, block_k, band_q, q_rows.ld, 1.f, grad_k_acc.data(), head_dim);
              // dQ += scale dS K
              gemm(Transpose::no, Transpose::no, rows, head_dim, keys, static_cast<float>(scale),
                   band_grad_scores_operand, block_k, k_rows.data, k_rows.ld, 1.f, grad_q_rows + first_row * head_dim,
                   head_dim);
            });
          }
        }
        for (int64_t r = 0; r < block_k; ++r) {
          const int64_t out_row = (b * kv_heads + kvh) * seq_k + first_key + r;
          store_row(&grad_k_acc[r * head_dim], head_dim, k.scalar_type(), mutable_element_ptr(grad_k, out_row * head_dim));
          store_row(&grad_v_acc[r * head_dim], head_dim, v.scalar_type(), mutable_element_ptr(grad_v, out_row * head_dim));
        }
      }
    }
  });
  if (grad_q_in_place) return {grad_q, grad_k, grad_v};

  // dQ = the split partials summed in split order, in q's dtype
  const int64_t rows = batch * heads * seq_q, split_stride = rows * head_dim;
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> total(head_dim);
    for (int64_t row = begin; row < end; ++row) {
      std::memcpy(total.data(), grad_q_acc + row * head_dim, head_dim * sizeof(float));
      for (int64_t split = 1; split < splits; ++split) {
        const float* partial = grad_q_acc + split * split_stride + row * head_dim;
        for (int64_t c = 0; c < head_dim; ++c) total[c] += partial[c];
      }
      store_row(total.data(), head_dim, q.scalar_type(), mutable_element_ptr(grad_q, row * head_dim));
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale) {
  check_attention_inputs(q, k, v);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type(),
                "fastgpt native attention_backward: ", name, " must be a CPU tensor with the shape ", q.sizes(),
                " and dtype ", q.scalar_type(), " of q, got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  }
  const int64_t batch = q.size(0), heads = q.size(1), seq_q = q.size(2);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3),
              "fastgpt native attention_backward: lse must be a float32 CPU tensor of shape (", batch, ", ", heads,
              ", ", seq_q, "), got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  return bf16_products(q) ? attention_backward_tiles<c10::BFloat16>(grad_out, q, k, v, out, lse, causal, scale)
                          : attention_backward_tiles<float>(grad_out, q, k, v, out, lse, causal, scale);
}

}  // namespace fastgpt::cpu
