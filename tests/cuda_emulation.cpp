// Runs the per-item bodies of the CUDA token kernels (csrc/tokens_kernels.cuh) on the CPU, one
// item after another, so that their index arithmetic, vector paths and fp16/bf16 conversions are
// tested on machines without a GPU. Built with g++ by tests/test_extension.py (ctypes); not part
// of the package. Each function returns 0, or 1 when a device-side check fired (message in
// emu_last_error).
#include <cstdint>
#include <stdexcept>
#include <string>

#include "tokens_kernels.cuh"

using namespace mae_fast::kern;

static std::string g_error;

extern "C" const char* emu_last_error() { return g_error.c_str(); }

template <typename F>
static int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}

template <typename I, typename U>
static void gather_all(const void* x, const void* ids, void* out, int64_t B, int64_t L, int64_t K, int64_t units) {
  for (int64_t i = 0; i < B * K * units; ++i)
    gather_item<I, U>(static_cast<const U*>(x), ids, static_cast<U*>(out), L, K, units, i);
}

template <typename I>
static void gather_units(int unit, const void* x, const void* ids, void* out, int64_t B, int64_t L, int64_t K,
                         int64_t units) {
  switch (unit) {
    case 16: return gather_all<I, uint4>(x, ids, out, B, L, K, units);
    case 8: return gather_all<I, uint2>(x, ids, out, B, L, K, units);
    case 4: return gather_all<I, uint32_t>(x, ids, out, B, L, K, units);
    case 2: return gather_all<I, uint16_t>(x, ids, out, B, L, K, units);
    default: return gather_all<I, uint8_t>(x, ids, out, B, L, K, units);
  }
}

extern "C" int emu_gather(int unit, int ids64, const void* x, const void* ids, void* out, int64_t B, int64_t L,
                          int64_t K, int64_t row_bytes) {
  return guarded([&] {
    const int64_t units = row_bytes / unit;
    if (ids64) gather_units<int64_t>(unit, x, ids, out, B, L, K, units);
    else gather_units<int32_t>(unit, x, ids, out, B, L, K, units);
  });
}

extern "C" int emu_invert(int ids64, const void* ids, int32_t* inv, int64_t B, int64_t K, int64_t N) {
  return guarded([&] {
    for (int64_t i = 0; i < B * N; ++i) inv[i] = -1;
    for (int64_t i = 0; i < B * K; ++i) {
      if (ids64) invert_item<int64_t>(ids, inv, K, N, i);
      else invert_item<int32_t>(ids, inv, K, N, i);
    }
  });
}

template <typename T, typename Aux>
static void fwd_typed(int vec, const void* vis, const int32_t* inv, const void* mask, const void* pos, void* out,
                      int64_t B, int64_t P, int64_t K, int64_t N, int64_t D) {
  UnshuffleFwdArgs<T, Aux> a{static_cast<const T*>(vis), inv, static_cast<const Aux*>(mask),
                             static_cast<const Aux*>(pos), static_cast<T*>(out), B, P, K, N, D};
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec) {
    for (int64_t i = 0; i < B * (P + N) * (D / V); ++i) unshuffle_fwd_item<V>(a, i);
  } else {
    for (int64_t i = 0; i < B * (P + N) * D; ++i) unshuffle_fwd_item<1>(a, i);
  }
}

// kind: 0 float32, 1 float16, 2 bfloat16, 3 float64; aux_same: mask/pos of visible's kind, else float32.
extern "C" int emu_unshuffle_fwd(int kind, int aux_same, int vec, const void* vis, const int32_t* inv,
                                 const void* mask, const void* pos, void* out, int64_t B, int64_t P, int64_t K,
                                 int64_t N, int64_t D) {
  return guarded([&] {
    switch (kind) {
      case 0: return fwd_typed<float, float>(vec, vis, inv, mask, pos, out, B, P, K, N, D);
      case 3: return fwd_typed<double, double>(vec, vis, inv, mask, pos, out, B, P, K, N, D);
      case 1:
        return aux_same ? fwd_typed<__half, __half>(vec, vis, inv, mask, pos, out, B, P, K, N, D)
                        : fwd_typed<__half, float>(vec, vis, inv, mask, pos, out, B, P, K, N, D);
      default:
        return aux_same ? fwd_typed<__nv_bfloat16, __nv_bfloat16>(vec, vis, inv, mask, pos, out, B, P, K, N, D)
                        : fwd_typed<__nv_bfloat16, float>(vec, vis, inv, mask, pos, out, B, P, K, N, D);
    }
  });
}

template <typename T>
static void bwd_typed(int vec, const void* g, const int32_t* inv, void* gvis, void* ppart, void* mpart, int64_t B,
                      int64_t P, int64_t K, int64_t N, int64_t D, int64_t bsplit, int64_t nsplit, int need_pos,
                      int need_mask) {
  using A = typename AccOf<T>::type;
  UnshuffleBwdArgs<T> a{static_cast<const T*>(g), inv, static_cast<T*>(gvis), static_cast<A*>(ppart),
                        static_cast<A*>(mpart), B, P, K, N, D, bsplit, nsplit, need_pos != 0, need_mask != 0};
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec) {
    for (int64_t i = 0; i < nsplit * (P + N) * (D / V); ++i) unshuffle_bwd_item<V>(a, i);
  } else {
    for (int64_t i = 0; i < nsplit * (P + N) * D; ++i) unshuffle_bwd_item<1>(a, i);
  }
}

extern "C" int emu_unshuffle_bwd(int kind, int vec, const void* g, const int32_t* inv, void* gvis, void* ppart,
                                 void* mpart, int64_t B, int64_t P, int64_t K, int64_t N, int64_t D, int64_t bsplit,
                                 int64_t nsplit, int need_pos, int need_mask) {
  return guarded([&] {
    switch (kind) {
      case 0: return bwd_typed<float>(vec, g, inv, gvis, ppart, mpart, B, P, K, N, D, bsplit, nsplit, need_pos, need_mask);
      case 1: return bwd_typed<__half>(vec, g, inv, gvis, ppart, mpart, B, P, K, N, D, bsplit, nsplit, need_pos, need_mask);
      case 2:
        return bwd_typed<__nv_bfloat16>(vec, g, inv, gvis, ppart, mpart, B, P, K, N, D, bsplit, nsplit, need_pos,
                                        need_mask);
      default: return bwd_typed<double>(vec, g, inv, gvis, ppart, mpart, B, P, K, N, D, bsplit, nsplit, need_pos, need_mask);
    }
  });
}

extern "C" int emu_column_sum(int f64, const void* in, void* out, int64_t R, int64_t C, int64_t chunk) {
  return guarded([&] {
    const int64_t n = ((R + chunk - 1) / chunk) * C;
    for (int64_t i = 0; i < n; ++i) {
      if (f64) column_sum_item<double>(static_cast<const double*>(in), static_cast<double*>(out), R, C, chunk, i);
      else column_sum_item<float>(static_cast<const float*>(in), static_cast<float*>(out), R, C, chunk, i);
    }
  });
}
