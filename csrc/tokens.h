// Token shuffle / unshuffle ops (mae_fast::tokens_*): what the C++ host code and the CUDA
// launchers share. The schemas are declared in Python (mae_fast/ops/tokens.py); this library only
// registers implementations (TORCH_LIBRARY_IMPL) for CPU (tokens_cpu.cpp) and CUDA
// (tokens_cuda_host.cpp, which calls the torch-free launchers of tokens_cuda.cu).
#pragma once

#include <cstdint>

namespace mae_fast {
namespace tokens {

// Validates an index tensor's data on the host: every ids[b, k] in [0, num_rows) and no value
// twice in a row b. Throws IndexError (out of range) / ValueError (duplicate) naming `name`.
// ids: (B, K) contiguous int32 or int64 (ids_is_64).
void check_ids_host(const void* ids, bool ids_is_64, int64_t B, int64_t K, int64_t num_rows,
                    const char* name);

#ifdef MAE_FAST_WITH_CUDA
// Element kinds understood by the CUDA launchers (tokens_cuda.cu holds no torch headers).
enum class Kind : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// Every launcher enqueues on `stream` (a cudaStream_t) and returns a cudaError_t as int
// (0 = success) so that this header needs no CUDA header either.

// out[b, k, :] = x[b, ids[b, k], :] for rows of row_bytes bytes, copied in units of unit_bytes
// (16, 8, 4, 2 or 1; must divide row_bytes and the alignment of x and out).
int launch_gather(const void* x, const void* ids, bool ids_is_64, void* out, int64_t B, int64_t L,
                  int64_t K, int64_t row_bytes, int unit_bytes, void* stream);

// inv (B, N) int32: inv[b, ids[b, k]] = k, -1 elsewhere. Traps (device assert) on an out-of-range
// or duplicate index.
int launch_invert(const void* ids, bool ids_is_64, int32_t* inv, int64_t B, int64_t K, int64_t N,
                  void* stream);

// out (B, P + N, D) of kind t from visible (B, P + K, D) of kind t and inv (B, N): prefix rows
// copied, row P + l = visible[b, P + inv[b, l]] if inv >= 0 else mask_token; + pos[row] if pos.
// mask and pos (either may be null) are of kind aux, which is t or F32 (F64 for t = F64).
// vec: use 16-byte vectors (D a multiple of 16 / sizeof(t) and all pointers 16-byte aligned).
int launch_unshuffle_fwd(Kind t, Kind aux, const void* visible, const int32_t* inv, const void* mask,
                         const void* pos, void* out, int64_t B, int64_t P, int64_t K, int64_t N,
                         int64_t D, bool vec, void* stream);

// Backward of the unshuffle, one pass over grad_out (B, S = P + N, D) of kind t, split over the
// batch into nsplit chunks of bsplit rows:
//   grad_visible (B, P + K, D) kind t: every row written (the gather of grad_out);
//   pos_part  (nsplit, S, D) in acc (float, double for F64): per-chunk batch sums, if need_pos;
//   mask_part (nsplit, N, D) in acc: per-chunk sums of the removed rows of each slot, if need_mask.
int launch_unshuffle_bwd(Kind t, const void* grad_out, const int32_t* inv, void* grad_visible,
                         void* pos_part, void* mask_part, int64_t B, int64_t P, int64_t K, int64_t N,
                         int64_t D, int64_t bsplit, int64_t nsplit, bool need_pos, bool need_mask,
                         bool vec, void* stream);

// out (ceil(R / chunk), C) = sums of consecutive chunks of `chunk` rows of in (R, C), in row
// order (deterministic). acc is F32 or F64.
int launch_column_sum(Kind acc, const void* in, void* out, int64_t R, int64_t C, int64_t chunk,
                      void* stream);
#endif

}  // namespace tokens
}  // namespace mae_fast
