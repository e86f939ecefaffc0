// CUDA implementations of the mae_fast::tokens_* ops, host side: argument checks, allocation
// (through the caching allocator), the current stream, and the launchers of tokens_cuda.cu.
// Compiled only into a CUDA build (MAE_FAST_WITH_CUDA); a host C++ file so that the .cu stays free
// of torch headers.
#ifdef MAE_FAST_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "tokens.h"
#include "tokens_common.h"

namespace mae_fast {
namespace tokens {
namespace {

Kind kind_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return Kind::F32;
    case at::kHalf: return Kind::F16;
    case at::kBFloat16: return Kind::BF16;
    case at::kDouble: return Kind::F64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "mae_fast tokens ops: unsupported dtype ", s);
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "mae_fast: ", what, " launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The explicit validate=True path: copies the indices to the host (a synchronisation) and checks
// range and uniqueness there, raising the same errors as the CPU kernels.
void validate_on_host(const at::Tensor& ids, int64_t num_rows, const char* name) {
  const at::Tensor h = ids.cpu().contiguous();
  check_ids_host(h.const_data_ptr(), h.scalar_type() == at::kLong, h.size(0), h.size(1), num_rows, name);
}

at::Tensor gather_cuda(const at::Tensor& x_, const at::Tensor& ids_, bool validate) {
  check_gather(x_, ids_);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), ids = ids_.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = ids.size(1);
  if (validate) validate_on_host(ids, L, "ids");
  at::Tensor out = at::empty({B, K, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  const uintptr_t a = reinterpret_cast<uintptr_t>(x.const_data_ptr()) | reinterpret_cast<uintptr_t>(out.const_data_ptr());
  int unit = 16;
  while (unit > 1 && (row_bytes % unit != 0 || a % unit != 0)) unit /= 2;
  check_launch(launch_gather(x.const_data_ptr(), ids.const_data_ptr(), ids.scalar_type() == at::kLong,
                             out.mutable_data_ptr(), B, L, K, row_bytes, unit, current_stream()),
               "tokens_gather");
  return out;
}

at::Tensor invert_cuda(const at::Tensor& ids_, int64_t num_rows, bool validate) {
  check_invert(ids_, num_rows);
  c10::cuda::CUDAGuard guard(ids_.device());
  const at::Tensor ids = ids_.contiguous();
  const int64_t B = ids.size(0), K = ids.size(1);
  if (validate) validate_on_host(ids, num_rows, "ids_keep");
  at::Tensor inv = at::empty({B, num_rows}, ids.options().dtype(at::kInt));
  check_launch(launch_invert(ids.const_data_ptr(), ids.scalar_type() == at::kLong, inv.mutable_data_ptr<int32_t>(), B,
                             K, num_rows, current_stream()),
               "tokens_invert");
  return inv;
}

at::Tensor unshuffle_cuda(const at::Tensor& visible_, const at::Tensor& inv_, const c10::optional<at::Tensor>& mask_,
                          const c10::optional<at::Tensor>& pos_, int64_t P) {
  check_unshuffle(visible_, inv_, mask_, pos_, P);
  c10::cuda::CUDAGuard guard(visible_.device());
  const at::Tensor visible = visible_.contiguous(), inv = inv_.contiguous();
  const int64_t B = visible.size(0), K = visible.size(1) - P, D = visible.size(2), N = inv.size(1);
  const at::ScalarType t = visible.scalar_type();
  // mask_token and pos are read in visible's dtype or in the accumulation dtype (fp32 parameters
  // under bf16 autocast); any other mix is converted (they are small next to the output).
  bool same = (!mask_.has_value() || mask_->scalar_type() == t) && (!pos_.has_value() || pos_->scalar_type() == t);
  const at::ScalarType aux = same ? t : (t == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor mask, pos;
  if (mask_.has_value()) mask = mask_->to(aux).contiguous();
  if (pos_.has_value()) pos = pos_->to(aux).contiguous();
  at::Tensor out = at::empty({B, P + N, D}, visible.options());
  const void* mp = mask.defined() ? mask.const_data_ptr() : nullptr;
  const void* pp = pos.defined() ? pos.const_data_ptr() : nullptr;
  const int64_t V = 16 / visible.element_size();
  const bool vec = D % V == 0 && aligned16(visible.const_data_ptr()) && aligned16(out.const_data_ptr()) &&
                   aligned16(mp) && aligned16(pp);
  check_launch(launch_unshuffle_fwd(kind_of(t), kind_of(aux), visible.const_data_ptr(), inv.const_data_ptr<int32_t>(),
                                    mp, pp, out.mutable_data_ptr(), B, P, K, N, D, vec, current_stream()),
               "tokens_unshuffle");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_bwd_cuda(const at::Tensor& grad_, const at::Tensor& inv_,
                                                                  int64_t P, int64_t K, bool need_mask, bool need_pos) {
  check_unshuffle_bwd(grad_, inv_, P, K);
  c10::cuda::CUDAGuard guard(grad_.device());
  const at::Tensor grad = grad_.contiguous(), inv = inv_.contiguous();
  const int64_t B = grad.size(0), D = grad.size(2), N = inv.size(1), S = P + N;
  const at::ScalarType t = grad.scalar_type();
  const at::ScalarType acc = t == at::kDouble ? at::kDouble : at::kFloat;
  const Kind acc_kind = kind_of(acc);
  const at::TensorOptions acc_opts = grad.options().dtype(acc);
  at::Tensor gvis = at::empty({B, P + K, D}, grad.options());
  at::Tensor gmask = at::empty({need_mask ? D : 0}, acc_opts);
  at::Tensor gpos = at::empty({need_pos ? S : 0, D}, acc_opts);
  if (grad.numel() == 0) {
    gmask.zero_();
    gpos.zero_();
    return {gvis, gmask, gpos};
  }
  const int64_t V = 16 / grad.element_size();
  const bool vec = D % V == 0 && aligned16(grad.const_data_ptr()) && aligned16(gvis.const_data_ptr());
  // Split the batch so that about 64K threads each sum >= 16 rows (fewer when B is small). The
  // split depends on the shapes and dtype only, not on `vec` (the pointers' alignment), so the
  // summation order is the same on every run and GPU, for any storage offset.
  const int64_t items = S * ((D + V - 1) / V);
  int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>((int64_t(1) << 16) / std::max<int64_t>(items, 1), B / 16));
  const int64_t bsplit = (B + nsplit - 1) / nsplit;
  nsplit = (B + bsplit - 1) / bsplit;
  at::Tensor pos_part, mask_part;
  if (need_pos) pos_part = nsplit == 1 ? gpos : at::empty({nsplit, S, D}, acc_opts);
  if (need_mask) mask_part = at::empty({nsplit * N, D}, acc_opts);
  void* stream = current_stream();
  check_launch(launch_unshuffle_bwd(kind_of(t), grad.const_data_ptr(), inv.const_data_ptr<int32_t>(),
                                    gvis.mutable_data_ptr(), need_pos ? pos_part.mutable_data_ptr() : nullptr,
                                    need_mask ? mask_part.mutable_data_ptr() : nullptr, B, P, K, N, D, bsplit, nsplit,
                                    need_pos, need_mask, vec, stream),
               "tokens_unshuffle_bwd");
  if (need_pos && nsplit > 1) {
    check_launch(launch_column_sum(acc_kind, pos_part.const_data_ptr(), gpos.mutable_data_ptr(), nsplit, S * D, nsplit,
                                   stream),
                 "tokens_unshuffle_bwd (pos sum)");
  }
  if (need_mask) {
    const int64_t R = nsplit * N;
    if (R == 0) {
      gmask.zero_();
    } else {
      constexpr int64_t kChunk = 32;  // rows per partial sum of the first level
      const int64_t G = (R + kChunk - 1) / kChunk;
      if (G == 1) {
        check_launch(launch_column_sum(acc_kind, mask_part.const_data_ptr(), gmask.mutable_data_ptr(), R, D, R, stream),
                     "tokens_unshuffle_bwd (mask sum)");
      } else {
        at::Tensor mid = at::empty({G, D}, acc_opts);
        check_launch(launch_column_sum(acc_kind, mask_part.const_data_ptr(), mid.mutable_data_ptr(), R, D, kChunk, stream),
                     "tokens_unshuffle_bwd (mask sum)");
        check_launch(launch_column_sum(acc_kind, mid.const_data_ptr(), gmask.mutable_data_ptr(), G, D, G, stream),
                     "tokens_unshuffle_bwd (mask sum)");
      }
    }
  }
  return {gvis, gmask, gpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(mae_fast, CUDA, m) {
  m.impl("tokens_gather", &gather_cuda);
  m.impl("tokens_invert", &invert_cuda);
  m.impl("tokens_unshuffle", &unshuffle_cuda);
  m.impl("tokens_unshuffle_bwd", &unshuffle_bwd_cuda);
}

}  // namespace tokens
}  // namespace mae_fast

#endif  // MAE_FAST_WITH_CUDA
