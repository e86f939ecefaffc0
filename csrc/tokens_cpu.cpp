// CPU kernels of the token ops, registered for mae_fast::tokens_* (schemas: mae_fast/ops/tokens.py).
//
//   tokens_gather(x, ids, validate)         out[b, k] = x[b, ids[b, k]]
//   tokens_invert(ids, num_rows, validate)  inv[b, ids[b, k]] = k, -1 elsewhere (int32)
//   tokens_unshuffle(visible, inv, mask_token?, pos?, num_prefix)
//   tokens_unshuffle_bwd(grad_out, inv, num_prefix, num_keep, need_mask, need_pos)
//
// Index data is always validated on the CPU (it is cheap next to the copy): an out-of-range index
// raises IndexError, a duplicate ValueError, before anything is written. Rows are spread over
// threads with at::parallel_for; reductions use a fixed partition of the rows that does not depend
// on the thread count, so gradients are bit-identical run to run.
#include <cstring>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "tokens.h"
#include "tokens_common.h"

namespace mae_fast {
namespace tokens {

namespace {

template <typename I>
void check_ids_typed(const I* ids, int64_t B, int64_t K, int64_t num_rows, const char* name) {
  std::vector<uint8_t> seen(static_cast<size_t>(num_rows));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t v = static_cast<int64_t>(ids[b * K + k]);
      TORCH_CHECK_INDEX(v >= 0 && v < num_rows, name, "[", b, ", ", k, "] = ", v, " is out of range: indices must be in [0, ",
                        num_rows, ")");
      TORCH_CHECK_VALUE(!seen[v], name, "[", b, ", ", k, "] = ", v, " repeats an index of row ", b,
                        ": indices must be unique per row");
      seen[v] = 1;
    }
  }
}

// Grain sizes: rows per task, aiming at ~32 KiB of copying per task.
int64_t grain_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t(32) << 10) / std::max<int64_t>(row_bytes, 1));
}

}  // namespace

void check_ids_host(const void* ids, bool ids_is_64, int64_t B, int64_t K, int64_t num_rows, const char* name) {
  if (ids_is_64) {
    check_ids_typed(static_cast<const int64_t*>(ids), B, K, num_rows, name);
  } else {
    check_ids_typed(static_cast<const int32_t*>(ids), B, K, num_rows, name);
  }
}

namespace {

// ----------------------------------------------------------------------------- gather

at::Tensor gather_cpu(const at::Tensor& x_, const at::Tensor& ids_, bool /*validate: always on CPU*/) {
  check_gather(x_, ids_);
  const at::Tensor x = x_.contiguous(), ids = ids_.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = ids.size(1);
  const bool i64 = ids.scalar_type() == at::kLong;
  check_ids_host(ids.const_data_ptr(), i64, B, K, L, "ids");
  at::Tensor out = at::empty({B, K, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const void* idp = ids.const_data_ptr();
  at::parallel_for(0, B * K, grain_rows(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / K;
      const int64_t id = i64 ? static_cast<const int64_t*>(idp)[r] : static_cast<const int32_t*>(idp)[r];
      std::memcpy(dst + r * row_bytes, src + (b * L + id) * row_bytes, row_bytes);
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- invert

at::Tensor invert_cpu(const at::Tensor& ids_, int64_t num_rows, bool /*validate: always on CPU*/) {
  check_invert(ids_, num_rows);
  const at::Tensor ids = ids_.contiguous();
  const int64_t B = ids.size(0), K = ids.size(1);
  const bool i64 = ids.scalar_type() == at::kLong;
  check_ids_host(ids.const_data_ptr(), i64, B, K, num_rows, "ids_keep");
  at::Tensor inv = at::empty({B, num_rows}, ids.options().dtype(at::kInt));
  int32_t* out = inv.mutable_data_ptr<int32_t>();
  const void* idp = ids.const_data_ptr();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* row = out + b * num_rows;
      std::fill(row, row + num_rows, -1);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t id = i64 ? static_cast<const int64_t*>(idp)[b * K + k] : static_cast<const int32_t*>(idp)[b * K + k];
        row[id] = static_cast<int32_t>(k);
      }
    }
  });
  return inv;
}

// Checks an inv tensor (B, N) from a caller of the low-level op (normally tokens_invert made it):
// every value -1 or in [0, K), and each k in [0, K) exactly once per row, so that every output row
// is written exactly once.
void check_inv_values(const int32_t* inv, int64_t B, int64_t N, int64_t K, const char* op) {
  std::vector<uint8_t> seen(static_cast<size_t>(K));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    int64_t count = 0;
    for (int64_t l = 0; l < N; ++l) {
      const int32_t k = inv[b * N + l];
      TORCH_CHECK_INDEX(k >= -1 && k < K, op, ": inv[", b, ", ", l, "] = ", k, " is outside [-1, ", K, ")");
      if (k >= 0) {
        TORCH_CHECK_VALUE(!seen[k], op, ": inv row ", b, " holds ", k, " twice");
        seen[k] = 1;
        ++count;
      }
    }
    TORCH_CHECK_VALUE(count == K, op, ": inv row ", b, " maps ", count, " slots, expected num_keep = ", K);
  }
}

// ----------------------------------------------------------------------------- unshuffle forward

// An auxiliary (mask_token / pos) tensor as a contiguous tensor in the accumulation dtype.
at::Tensor aux_as(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

template <typename T>
void unshuffle_fwd_typed(const at::Tensor& visible, const at::Tensor& inv, const c10::optional<at::Tensor>& mask_,
                         const c10::optional<at::Tensor>& pos_, int64_t P, at::Tensor& out) {
  using A = at::opmath_type<T>;
  const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
  const int64_t B = visible.size(0), K = visible.size(1) - P, D = visible.size(2), N = inv.size(1), S = P + N;
  at::Tensor mask_t, pos_t;
  const A* mask = nullptr;
  const A* pos = nullptr;
  if (mask_.has_value()) {
    mask_t = aux_as(*mask_, acc);
    mask = mask_t.const_data_ptr<A>();
  }
  if (pos_.has_value()) {
    pos_t = aux_as(*pos_, acc);
    pos = pos_t.const_data_ptr<A>();
  }
  const T* vis = visible.const_data_ptr<T>();
  const int32_t* iv = inv.const_data_ptr<int32_t>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, B * S, grain_rows(D * sizeof(T)), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / S, j = row - b * S;
      const T* src = nullptr;  // null: a mask row
      if (j < P) {
        src = vis + (b * (P + K) + j) * D;
      } else {
        const int32_t k = iv[b * N + (j - P)];
        if (k >= 0) src = vis + (b * (P + K) + P + k) * D;
      }
      T* dst = o + row * D;
      const A* p = pos ? pos + j * D : nullptr;
      if (src != nullptr && p == nullptr) {
        std::memcpy(dst, src, D * sizeof(T));
      } else if (src != nullptr) {
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(static_cast<A>(src[d]) + p[d]);
      } else if (mask != nullptr && p != nullptr) {
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(mask[d] + p[d]);
      } else if (mask != nullptr) {
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(mask[d]);
      } else if (p != nullptr) {
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(p[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(A(0));
      }
    }
  });
}

at::Tensor unshuffle_cpu(const at::Tensor& visible_, const at::Tensor& inv_, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& pos, int64_t P) {
  check_unshuffle(visible_, inv_, mask, pos, P);
  const at::Tensor visible = visible_.contiguous(), inv = inv_.contiguous();
  const int64_t B = visible.size(0), K = visible.size(1) - P, D = visible.size(2), N = inv.size(1);
  check_inv_values(inv.const_data_ptr<int32_t>(), B, N, K, "mae_fast.tokens_unshuffle");
  at::Tensor out = at::empty({B, P + N, D}, visible.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, visible.scalar_type(), "tokens_unshuffle_cpu", [&] {
    unshuffle_fwd_typed<scalar_t>(visible, inv, mask, pos, P, out);
  });
  return out;
}

// ----------------------------------------------------------------------------- unshuffle backward

template <typename T>
void unshuffle_bwd_typed(const at::Tensor& grad, const at::Tensor& inv, int64_t P, int64_t K, bool need_mask,
                         bool need_pos, at::Tensor& gvis, at::Tensor& gmask, at::Tensor& gpos) {
  using A = at::opmath_type<T>;
  const int64_t B = grad.size(0), D = grad.size(2), N = inv.size(1), S = P + N;
  const T* g = grad.const_data_ptr<T>();
  const int32_t* iv = inv.const_data_ptr<int32_t>();
  T* gv = gvis.mutable_data_ptr<T>();
  // Per-slot sums of the removed rows (N, D); summed over slots in order at the end.
  std::vector<A> mask_rows(need_mask ? static_cast<size_t>(N * D) : 0, A(0));
  A* gp = need_pos ? gpos.mutable_data_ptr<A>() : nullptr;
  // One task per sequence row j: its batch loop runs in fixed order b = 0..B-1.
  at::parallel_for(0, S, std::max<int64_t>(1, grain_rows(B * D * sizeof(T))), [&](int64_t j0, int64_t j1) {
    std::vector<A> pacc(need_pos ? D : 0);
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(pacc.begin(), pacc.end(), A(0));
      A* macc = (need_mask && j >= P) ? mask_rows.data() + (j - P) * D : nullptr;
      for (int64_t b = 0; b < B; ++b) {
        const T* row = g + (b * S + j) * D;
        if (need_pos) {
          for (int64_t d = 0; d < D; ++d) pacc[d] += static_cast<A>(row[d]);
        }
        int64_t dst = -1;
        if (j < P) {
          dst = b * (P + K) + j;
        } else {
          const int32_t k = iv[b * N + (j - P)];
          if (k >= 0) {
            dst = b * (P + K) + P + k;
          } else if (macc != nullptr) {
            for (int64_t d = 0; d < D; ++d) macc[d] += static_cast<A>(row[d]);
          }
        }
        if (dst >= 0) std::memcpy(gv + dst * D, row, D * sizeof(T));
      }
      if (need_pos) std::copy(pacc.begin(), pacc.end(), gp + j * D);
    }
  });
  if (need_mask) {
    A* gm = gmask.mutable_data_ptr<A>();
    std::fill(gm, gm + D, A(0));
    for (int64_t l = 0; l < N; ++l) {
      const A* r = mask_rows.data() + l * D;
      for (int64_t d = 0; d < D; ++d) gm[d] += r[d];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_bwd_cpu(const at::Tensor& grad_, const at::Tensor& inv_,
                                                                 int64_t P, int64_t K, bool need_mask, bool need_pos) {
  check_unshuffle_bwd(grad_, inv_, P, K);
  const at::Tensor grad = grad_.contiguous(), inv = inv_.contiguous();
  const int64_t B = grad.size(0), D = grad.size(2), N = inv.size(1);
  check_inv_values(inv.const_data_ptr<int32_t>(), B, N, K, "mae_fast.tokens_unshuffle_bwd");
  const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gvis = at::empty({B, P + K, D}, grad.options());
  at::Tensor gmask = at::empty({need_mask ? D : 0}, grad.options().dtype(acc));
  at::Tensor gpos = at::empty({need_pos ? P + N : 0, D}, grad.options().dtype(acc));
  if (grad.numel() == 0) {
    gmask.zero_();
    gpos.zero_();
    return {gvis, gmask, gpos};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "tokens_unshuffle_bwd_cpu", [&] {
    unshuffle_bwd_typed<scalar_t>(grad, inv, P, K, need_mask, need_pos, gvis, gmask, gpos);
  });
  return {gvis, gmask, gpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) {
  m.impl("tokens_gather", &gather_cpu);
  m.impl("tokens_invert", &invert_cpu);
  m.impl("tokens_unshuffle", &unshuffle_cpu);
  m.impl("tokens_unshuffle_bwd", &unshuffle_bwd_cpu);
}

}  // namespace tokens
}  // namespace mae_fast
