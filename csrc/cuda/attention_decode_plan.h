// How the split-key decode (attention_decode.cu) cuts its work: query rows per block and key
// slices. Plain C++, so a host test compiled with g++ (tests/test_cuda_sources.py) checks the rule.
#pragma once

#include <cstdint>

namespace fastgpt {
namespace cuda {

constexpr int kDecodeKeysPerSplitMin = 64;  // fewer keys per block would not pay for its merge
constexpr int kDecodeMaxTileRows = 8;       // query rows per block: q and o of 8 rows take 128 registers

struct DecodePlan {
  int tile_rows;           // R: query rows per block (1, 2, 4, 8)
  int64_t row_tiles;       // blocks per (batch, kv head) and slice
  int64_t splits;          // key slices
  int64_t keys_per_split;  // keys in each slice (the last may be shorter, none is empty)
};

// A block takes R rows of one kv head's query rows (heads / kv_heads * seq_q of them), R the
// smallest of 1, 2, 4, 8 that covers them (8 at most: more rows read that head's K/V again);
// then enough key slices to fill the device about 4 times over, of at least
// kDecodeKeysPerSplitMin keys.
inline DecodePlan decode_plan(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seq_q, int64_t seq_k,
                              int multiprocessors) {
  const int64_t group_rows = (kv_heads > 0 ? heads / kv_heads : 1) * seq_q;
  const int tile_rows = group_rows <= 1 ? 1 : group_rows <= 2 ? 2 : group_rows <= 4 ? 4 : kDecodeMaxTileRows;
  const int64_t row_tiles = (group_rows + tile_rows - 1) / tile_rows;
  const int64_t tiles = batch * kv_heads * row_tiles;
  const int64_t target_blocks = 4 * int64_t(multiprocessors > 0 ? multiprocessors : 1);
  const int64_t max_splits = seq_k > kDecodeKeysPerSplitMin ? (seq_k + kDecodeKeysPerSplitMin - 1) / kDecodeKeysPerSplitMin : 1;
  int64_t splits = tiles > 0 ? (target_blocks + tiles - 1) / tiles : 1;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  const int64_t keys_per_split = seq_k > 0 ? (seq_k + splits - 1) / splits : 1;
  const int64_t used_splits = seq_k > 0 ? (seq_k + keys_per_split - 1) / keys_per_split : 1;
  return {tile_rows, row_tiles, used_splits, keys_per_split};
}

}  // namespace cuda
}  // namespace fastgpt
