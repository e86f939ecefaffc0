// Per-element bodies of the CUDA token kernels, written as __host__ __device__ functions of one
// work item so that tokens_cuda.cu wraps them in grid-stride kernels and the test suite can run
// the very same bodies on the CPU (tests/cuda_emulation.cpp) where no GPU is present.
// No torch headers here: only the CUDA half/bfloat16 types.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#if defined(__CUDACC__)
#define MAE_HD __host__ __device__ __forceinline__
#else
#define MAE_HD inline
#endif

#if defined(__CUDA_ARCH__)
#include <cassert>
// A failed check aborts the kernel with "device-side assert triggered"; the message (the string
// below) is printed by the CUDA runtime. Active whatever NDEBUG says.
#define MAE_DEVICE_CHECK(cond, msg)                                                    \
  do {                                                                                 \
    if (!(cond)) __assert_fail(msg, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
  } while (0)
#else
#include <stdexcept>
#define MAE_DEVICE_CHECK(cond, msg)              \
  do {                                           \
    if (!(cond)) throw std::runtime_error(msg);  \
  } while (0)
#endif

namespace mae_fast {
namespace kern {

// ----------------------------------------------------------------------------- element types

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

MAE_HD float to_acc(float x) { return x; }
MAE_HD double to_acc(double x) { return x; }
MAE_HD float to_acc(__half x) { return __half2float(x); }
MAE_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> MAE_HD T from_acc(float x);
template <> MAE_HD float from_acc<float>(float x) { return x; }
template <> MAE_HD __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> MAE_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> MAE_HD T from_acc(double x);
template <> MAE_HD double from_acc<double>(double x) { return x; }

// Quotient and remainder; 32-bit arithmetic when both fit (64-bit division is slow on GPUs).
MAE_HD void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((a | b) >> 32) == 0) {
    const uint32_t ua = static_cast<uint32_t>(a), ub = static_cast<uint32_t>(b);
    q = ua / ub;
    r = ua - static_cast<uint32_t>(q) * ub;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// ----------------------------------------------------------------------------- vector memory

// N elements of S starting at p. Uses 16-byte accesses when N elements fill whole 16-byte words
// (the caller guarantees 16-byte alignment in that case), element accesses otherwise.
template <int N, typename S>
MAE_HD void load_raw(const S* __restrict__ p, S (&v)[N]) {
  constexpr int PER = 16 / static_cast<int>(sizeof(S));
  if constexpr (N >= PER && N % PER == 0) {
#pragma unroll
    for (int i = 0; i < N / PER; ++i) {
      const uint4 u = reinterpret_cast<const uint4*>(p)[i];
      memcpy(&v[i * PER], &u, 16);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = p[i];
  }
}

template <int N, typename S>
MAE_HD void store_raw(S* __restrict__ p, const S (&v)[N]) {
  constexpr int PER = 16 / static_cast<int>(sizeof(S));
  if constexpr (N >= PER && N % PER == 0) {
#pragma unroll
    for (int i = 0; i < N / PER; ++i) {
      uint4 u;
      memcpy(&u, &v[i * PER], 16);
      reinterpret_cast<uint4*>(p)[i] = u;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = v[i];
  }
}

template <int N, typename S, typename A>
MAE_HD void add_loaded(const S* __restrict__ p, A (&acc)[N]) {
  S v[N];
  load_raw<N>(p, v);
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] += static_cast<A>(to_acc(v[i]));
}

template <typename I>
MAE_HD int64_t load_index(const void* ids, int64_t i) {
  return static_cast<int64_t>(static_cast<const I*>(ids)[i]);
}

// ----------------------------------------------------------------------------- gather

// Work item i of B * K * units: one unit (U, 1..16 bytes) of one output row.
// out[b, k] = x[b, ids[b, k]]; rows are `units` units long.
template <typename I, typename U>
MAE_HD void gather_item(const U* __restrict__ x, const void* __restrict__ ids, U* __restrict__ out,
                        int64_t L, int64_t K, int64_t units, int64_t i) {
  int64_t r, u, b, k;
  divmod(i, units, r, u);
  divmod(r, K, b, k);
  const int64_t id = load_index<I>(ids, r);
  MAE_DEVICE_CHECK(id >= 0 && id < L, "mae_fast.gather_tokens: ids out of range [0, x.shape[1])");
  out[r * units + u] = x[(b * L + id) * units + u];
}

// ----------------------------------------------------------------------------- invert

MAE_HD int32_t claim_slot(int32_t* slot, int32_t k) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(slot, -1, k);  // integer CAS: the result does not depend on thread order
#else
  const int32_t old = *slot;
  if (old == -1) *slot = k;
  return old;
#endif
}

// Work item i of B * K: inv[b, ids[b, k]] = k (inv pre-filled with -1).
template <typename I>
MAE_HD void invert_item(const void* __restrict__ ids, int32_t* __restrict__ inv, int64_t K,
                        int64_t N, int64_t i) {
  int64_t b, k;
  divmod(i, K, b, k);
  const int64_t id = load_index<I>(ids, i);
  // inv is built for unshuffle_tokens (from ids_keep) and for gather_tokens' backward (from ids)
  MAE_DEVICE_CHECK(id >= 0 && id < N, "mae_fast: unshuffle_tokens' ids_keep or gather_tokens' ids out of range [0, L)");
  const int32_t old = claim_slot(inv + b * N + id, static_cast<int32_t>(k));
  MAE_DEVICE_CHECK(old == -1, "mae_fast: duplicate index in a row of unshuffle_tokens' ids_keep or gather_tokens' ids");
}

// ----------------------------------------------------------------------------- unshuffle forward

template <typename T, typename Aux>
struct UnshuffleFwdArgs {
  const T* visible;    // (B, P + K, D)
  const int32_t* inv;  // (B, N)
  const Aux* mask;     // (D) or null (zeros)
  const Aux* pos;      // (P + N, D) or null
  T* out;              // (B, P + N, D)
  int64_t B, P, K, N, D;
};

// Work item i of B * (P + N) * (D / VEC): VEC consecutive elements of one output row.
template <int VEC, typename T, typename Aux>
MAE_HD void unshuffle_fwd_item(const UnshuffleFwdArgs<T, Aux>& a, int64_t i) {
  using A = typename AccOf<T>::type;
  const int64_t nvec = a.D / VEC, S = a.P + a.N;
  int64_t row, c, b, j;
  divmod(i, nvec, row, c);
  divmod(row, S, b, j);
  const int64_t col = c * VEC;
  A acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = A(0);
  if (j < a.P) {
    add_loaded<VEC>(a.visible + (b * (a.P + a.K) + j) * a.D + col, acc);
  } else {
    const int64_t k = a.inv[b * a.N + (j - a.P)];
    MAE_DEVICE_CHECK(k >= -1 && k < a.K, "mae_fast.tokens_unshuffle: inv value outside [-1, number of visible rows)");
    if (k >= 0) {
      add_loaded<VEC>(a.visible + (b * (a.P + a.K) + a.P + k) * a.D + col, acc);
    } else if (a.mask != nullptr) {
      add_loaded<VEC>(a.mask + col, acc);
    }
  }
  if (a.pos != nullptr) add_loaded<VEC>(a.pos + j * a.D + col, acc);
  T o[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) o[v] = from_acc<T>(acc[v]);
  store_raw<VEC>(a.out + row * a.D + col, o);
}

// ----------------------------------------------------------------------------- unshuffle backward

template <typename T>
struct UnshuffleBwdArgs {
  using A = typename AccOf<T>::type;
  const T* grad_out;   // (B, P + N, D)
  const int32_t* inv;  // (B, N)
  T* grad_visible;     // (B, P + K, D)
  A* pos_part;         // (nsplit, P + N, D), written if need_pos
  A* mask_part;        // (nsplit, N, D), written if need_mask
  int64_t B, P, K, N, D, bsplit, nsplit;
  bool need_pos, need_mask;
};

// Work item i of nsplit * (P + N) * (D / VEC): VEC columns of sequence row j over the batch
// rows of chunk s, in increasing b (a fixed order: bit-identical results run to run).
template <int VEC, typename T>
MAE_HD void unshuffle_bwd_item(const UnshuffleBwdArgs<T>& a, int64_t i) {
  using A = typename AccOf<T>::type;
  const int64_t nvec = a.D / VEC, S = a.P + a.N;
  int64_t t, c, s, j;
  divmod(i, nvec, t, c);
  divmod(t, S, s, j);
  const int64_t col = c * VEC;
  A pacc[VEC], macc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) pacc[v] = macc[v] = A(0);
  const int64_t b0 = s * a.bsplit;
  const int64_t b1 = b0 + a.bsplit < a.B ? b0 + a.bsplit : a.B;
  for (int64_t b = b0; b < b1; ++b) {
    T g[VEC];
    load_raw<VEC>(a.grad_out + (b * S + j) * a.D + col, g);
    if (a.need_pos) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) pacc[v] += static_cast<A>(to_acc(g[v]));
    }
    int64_t dst = -1;
    if (j < a.P) {
      dst = b * (a.P + a.K) + j;
    } else {
      const int64_t k = a.inv[b * a.N + (j - a.P)];
      MAE_DEVICE_CHECK(k >= -1 && k < a.K, "mae_fast.tokens_unshuffle_bwd: inv value outside [-1, num_keep)");
      if (k >= 0) {
        dst = b * (a.P + a.K) + a.P + k;
      } else if (a.need_mask) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) macc[v] += static_cast<A>(to_acc(g[v]));
      }
    }
    if (dst >= 0) store_raw<VEC>(a.grad_visible + dst * a.D + col, g);
  }
  if (a.need_pos) store_raw<VEC>(a.pos_part + (s * S + j) * a.D + col, pacc);
  if (a.need_mask && j >= a.P) store_raw<VEC>(a.mask_part + (s * a.N + (j - a.P)) * a.D + col, macc);
}

// ----------------------------------------------------------------------------- fixed-order sums

// Work item i of ceil(R / chunk) * C: out[g, c] = sum of in[r, c] over r in chunk g, r ascending.
template <typename A>
MAE_HD void column_sum_item(const A* __restrict__ in, A* __restrict__ out, int64_t R, int64_t C,
                            int64_t chunk, int64_t i) {
  int64_t g, c;
  divmod(i, C, g, c);
  const int64_t r0 = g * chunk, r1 = r0 + chunk < R ? r0 + chunk : R;
  A acc = A(0);
  for (int64_t r = r0; r < r1; ++r) acc += in[r * C + c];
  out[i] = acc;
}

}  // namespace kern
}  // namespace mae_fast
