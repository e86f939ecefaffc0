// CUDA kernels of the token ops: grid-stride wrappers around the per-item bodies of
// tokens_kernels.cuh, and the launchers declared in tokens.h. Deliberately free of torch headers
// (allocation, checks, streams and registration live in tokens_cuda_host.cpp): this file compiles
// in seconds.
#include <cuda_runtime.h>

#include "tokens.h"
#include "tokens_kernels.cuh"

namespace mae_fast {
namespace tokens {
namespace {

using kern::AccOf;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this

inline unsigned blocks_for(int64_t items) {
  int64_t b = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

#define MAE_GRID_STRIDE_LOOP(i, n)                                                     \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename I, typename U>
__global__ void __launch_bounds__(kThreads)
gather_kernel(const U* __restrict__ x, const void* __restrict__ ids, U* __restrict__ out, int64_t L,
              int64_t K, int64_t units, int64_t n) {
  MAE_GRID_STRIDE_LOOP(i, n) { kern::gather_item<I, U>(x, ids, out, L, K, units, i); }
}

template <typename I>
__global__ void __launch_bounds__(kThreads)
invert_kernel(const void* __restrict__ ids, int32_t* __restrict__ inv, int64_t K, int64_t N, int64_t n) {
  MAE_GRID_STRIDE_LOOP(i, n) { kern::invert_item<I>(ids, inv, K, N, i); }
}

template <int VEC, typename T, typename Aux>
__global__ void __launch_bounds__(kThreads)
unshuffle_fwd_kernel(const kern::UnshuffleFwdArgs<T, Aux> a, int64_t n) {
  MAE_GRID_STRIDE_LOOP(i, n) { kern::unshuffle_fwd_item<VEC>(a, i); }
}

template <int VEC, typename T>
__global__ void __launch_bounds__(kThreads)
unshuffle_bwd_kernel(const kern::UnshuffleBwdArgs<T> a, int64_t n) {
  MAE_GRID_STRIDE_LOOP(i, n) { kern::unshuffle_bwd_item<VEC>(a, i); }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
column_sum_kernel(const A* __restrict__ in, A* __restrict__ out, int64_t R, int64_t C, int64_t chunk,
                  int64_t n) {
  MAE_GRID_STRIDE_LOOP(i, n) { kern::column_sum_item<A>(in, out, R, C, chunk, i); }
}

template <typename I, typename U>
int gather_as(const void* x, const void* ids, void* out, int64_t B, int64_t L, int64_t K,
              int64_t units, cudaStream_t s) {
  const int64_t n = B * K * units;
  gather_kernel<I, U><<<blocks_for(n), kThreads, 0, s>>>(static_cast<const U*>(x), ids,
                                                         static_cast<U*>(out), L, K, units, n);
  return static_cast<int>(cudaGetLastError());
}

template <typename I>
int gather_idx(const void* x, const void* ids, void* out, int64_t B, int64_t L, int64_t K,
               int64_t row_bytes, int unit_bytes, cudaStream_t s) {
  const int64_t units = row_bytes / unit_bytes;
  switch (unit_bytes) {
    case 16: return gather_as<I, uint4>(x, ids, out, B, L, K, units, s);
    case 8: return gather_as<I, uint2>(x, ids, out, B, L, K, units, s);
    case 4: return gather_as<I, uint32_t>(x, ids, out, B, L, K, units, s);
    case 2: return gather_as<I, uint16_t>(x, ids, out, B, L, K, units, s);
    default: return gather_as<I, uint8_t>(x, ids, out, B, L, K, units, s);
  }
}

template <typename T, typename Aux>
int unshuffle_fwd_as(const void* visible, const int32_t* inv, const void* mask, const void* pos,
                     void* out, int64_t B, int64_t P, int64_t K, int64_t N, int64_t D, bool vec,
                     cudaStream_t s) {
  kern::UnshuffleFwdArgs<T, Aux> a{static_cast<const T*>(visible), inv, static_cast<const Aux*>(mask),
                                   static_cast<const Aux*>(pos), static_cast<T*>(out), B, P, K, N, D};
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int64_t rows = B * (P + N);
  if (vec) {
    const int64_t n = rows * (D / V);
    unshuffle_fwd_kernel<V, T, Aux><<<blocks_for(n), kThreads, 0, s>>>(a, n);
  } else {
    const int64_t n = rows * D;
    unshuffle_fwd_kernel<1, T, Aux><<<blocks_for(n), kThreads, 0, s>>>(a, n);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int unshuffle_bwd_as(const void* grad_out, const int32_t* inv, void* grad_visible, void* pos_part,
                     void* mask_part, int64_t B, int64_t P, int64_t K, int64_t N, int64_t D,
                     int64_t bsplit, int64_t nsplit, bool need_pos, bool need_mask, bool vec,
                     cudaStream_t s) {
  using A = typename AccOf<T>::type;
  kern::UnshuffleBwdArgs<T> a{static_cast<const T*>(grad_out), inv, static_cast<T*>(grad_visible),
                              static_cast<A*>(pos_part), static_cast<A*>(mask_part), B, P, K, N, D,
                              bsplit, nsplit, need_pos, need_mask};
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec) {
    const int64_t n = nsplit * (P + N) * (D / V);
    unshuffle_bwd_kernel<V, T><<<blocks_for(n), kThreads, 0, s>>>(a, n);
  } else {
    const int64_t n = nsplit * (P + N) * D;
    unshuffle_bwd_kernel<1, T><<<blocks_for(n), kThreads, 0, s>>>(a, n);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_gather(const void* x, const void* ids, bool ids_is_64, void* out, int64_t B, int64_t L,
                  int64_t K, int64_t row_bytes, int unit_bytes, void* stream) {
  if (B * K * row_bytes == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return ids_is_64 ? gather_idx<int64_t>(x, ids, out, B, L, K, row_bytes, unit_bytes, s)
                   : gather_idx<int32_t>(x, ids, out, B, L, K, row_bytes, unit_bytes, s);
}

int launch_invert(const void* ids, bool ids_is_64, int32_t* inv, int64_t B, int64_t K, int64_t N,
                  void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (B * N == 0) return 0;
  cudaError_t err = cudaMemsetAsync(inv, 0xFF, static_cast<size_t>(B * N) * sizeof(int32_t), s);  // -1
  if (err != cudaSuccess || B * K == 0) return static_cast<int>(err);
  const int64_t n = B * K;
  if (ids_is_64) {
    invert_kernel<int64_t><<<blocks_for(n), kThreads, 0, s>>>(ids, inv, K, N, n);
  } else {
    invert_kernel<int32_t><<<blocks_for(n), kThreads, 0, s>>>(ids, inv, K, N, n);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_unshuffle_fwd(Kind t, Kind aux, const void* visible, const int32_t* inv, const void* mask,
                         const void* pos, void* out, int64_t B, int64_t P, int64_t K, int64_t N,
                         int64_t D, bool vec, void* stream) {
  if (B * (P + N) * D == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const bool same = aux == t;  // otherwise aux is float (t half/bf16)
  switch (t) {
    case Kind::F32: return unshuffle_fwd_as<float, float>(visible, inv, mask, pos, out, B, P, K, N, D, vec, s);
    case Kind::F64: return unshuffle_fwd_as<double, double>(visible, inv, mask, pos, out, B, P, K, N, D, vec, s);
    case Kind::F16:
      return same ? unshuffle_fwd_as<__half, __half>(visible, inv, mask, pos, out, B, P, K, N, D, vec, s)
                  : unshuffle_fwd_as<__half, float>(visible, inv, mask, pos, out, B, P, K, N, D, vec, s);
    case Kind::BF16:
      return same ? unshuffle_fwd_as<__nv_bfloat16, __nv_bfloat16>(visible, inv, mask, pos, out, B, P, K, N, D, vec, s)
                  : unshuffle_fwd_as<__nv_bfloat16, float>(visible, inv, mask, pos, out, B, P, K, N, D, vec, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_unshuffle_bwd(Kind t, const void* grad_out, const int32_t* inv, void* grad_visible,
                         void* pos_part, void* mask_part, int64_t B, int64_t P, int64_t K, int64_t N,
                         int64_t D, int64_t bsplit, int64_t nsplit, bool need_pos, bool need_mask,
                         bool vec, void* stream) {
  if (B * (P + N) * D == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (t) {
    case Kind::F32:
      return unshuffle_bwd_as<float>(grad_out, inv, grad_visible, pos_part, mask_part, B, P, K, N, D,
                                     bsplit, nsplit, need_pos, need_mask, vec, s);
    case Kind::F64:
      return unshuffle_bwd_as<double>(grad_out, inv, grad_visible, pos_part, mask_part, B, P, K, N, D,
                                      bsplit, nsplit, need_pos, need_mask, vec, s);
    case Kind::F16:
      return unshuffle_bwd_as<__half>(grad_out, inv, grad_visible, pos_part, mask_part, B, P, K, N, D,
                                      bsplit, nsplit, need_pos, need_mask, vec, s);
    case Kind::BF16:
      return unshuffle_bwd_as<__nv_bfloat16>(grad_out, inv, grad_visible, pos_part, mask_part, B, P, K,
                                             N, D, bsplit, nsplit, need_pos, need_mask, vec, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_column_sum(Kind acc, const void* in, void* out, int64_t R, int64_t C, int64_t chunk,
                      void* stream) {
  const int64_t n = ((R + chunk - 1) / chunk) * C;
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (acc == Kind::F64) {
    column_sum_kernel<double><<<blocks_for(n), kThreads, 0, s>>>(static_cast<const double*>(in),
                                                                 static_cast<double*>(out), R, C, chunk, n);
  } else {
    column_sum_kernel<float><<<blocks_for(n), kThreads, 0, s>>>(static_cast<const float*>(in),
                                                               static_cast<float*>(out), R, C, chunk, n);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace tokens
}  // namespace mae_fast
