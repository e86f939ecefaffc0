// Argument checks shared by the CPU and CUDA implementations of the mae_fast::tokens_* ops.
// The public functions (mae_fast/ops/tokens.py) check shapes and dtypes first with the public
// argument names; these checks keep the low-level ops safe when called directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mae_fast {
namespace tokens {

inline bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* bname) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", bname, " is on ", b.device(), " but the tokens are on ",
                    a.device());
}

// tokens_gather(x (B, L, D), ids (B, K) int)
inline void check_gather(const at::Tensor& x, const at::Tensor& ids) {
  TORCH_CHECK_VALUE(x.dim() == 3, "mae_fast.gather_tokens: x must be (B, L, D), got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_index_dtype(ids), "mae_fast.gather_tokens: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == x.size(0), "mae_fast.gather_tokens: ids must be (B, K) with B = ",
                    x.size(0), ", got shape ", ids.sizes());
  check_same_device(x, ids, "mae_fast.gather_tokens", "ids");
}

// tokens_invert(ids (B, K) int, num_rows)
inline void check_invert(const at::Tensor& ids, int64_t num_rows) {
  TORCH_CHECK_TYPE(is_index_dtype(ids), "mae_fast.unshuffle_tokens: ids_keep must be int32 or int64, got ",
                   ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2, "mae_fast.unshuffle_tokens: ids_keep must be (B, K), got shape ", ids.sizes());
  TORCH_CHECK_VALUE(num_rows >= 0 && num_rows < (int64_t(1) << 31),
                    "mae_fast.unshuffle_tokens: num_patches must be in [0, 2**31), got ", num_rows);
  TORCH_CHECK_VALUE(ids.size(1) <= num_rows, "mae_fast.unshuffle_tokens: ids_keep has ", ids.size(1),
                    " columns, more than num_patches = ", num_rows);
}

inline void check_inv(const at::Tensor& inv, int64_t B, const char* op) {
  TORCH_CHECK_TYPE(inv.scalar_type() == at::kInt, op, ": inv must be int32 (from tokens_invert), got ",
                   inv.scalar_type());
  TORCH_CHECK_VALUE(inv.dim() == 2 && inv.size(0) == B, op, ": inv must be (B, num_patches) with B = ", B,
                    ", got shape ", inv.sizes());
}

// tokens_unshuffle(visible (B, P + K, D), inv (B, N), mask_token (D)?, pos (P + N, D)?, P)
inline void check_unshuffle(const at::Tensor& visible, const at::Tensor& inv, const c10::optional<at::Tensor>& mask,
                            const c10::optional<at::Tensor>& pos, int64_t P) {
  const char* op = "mae_fast.unshuffle_tokens";
  TORCH_CHECK_VALUE(visible.dim() == 3, op, ": visible must be (B, num_prefix + K, D), got shape ", visible.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(visible.scalar_type()), op, ": visible must be float32, float16, bfloat16 or float64, got ",
                   visible.scalar_type());
  TORCH_CHECK_VALUE(P >= 0 && P <= visible.size(1), op, ": num_prefix must be in [0, visible.shape[1] = ",
                    visible.size(1), "], got ", P);
  check_inv(inv, visible.size(0), op);
  check_same_device(visible, inv, op, "ids_keep");
  const int64_t D = visible.size(2), S = P + inv.size(1);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(is_float_dtype(mask->scalar_type()), op, ": mask_token must be a float tensor, got ",
                     mask->scalar_type());
    TORCH_CHECK_VALUE(mask->numel() == D, op, ": mask_token must have D = ", D, " elements, got shape ", mask->sizes());
    check_same_device(visible, *mask, op, "mask_token");
  }
  if (pos.has_value()) {
    TORCH_CHECK_TYPE(is_float_dtype(pos->scalar_type()), op, ": pos must be a float tensor, got ", pos->scalar_type());
    TORCH_CHECK_VALUE(pos->dim() == 2 && pos->size(0) == S && pos->size(1) == D, op,
                      ": pos must be (num_prefix + num_patches, D) = (", S, ", ", D, "), got shape ", pos->sizes());
    check_same_device(visible, *pos, op, "pos");
  }
}

// tokens_unshuffle_bwd(grad_out (B, P + N, D), inv (B, N), P, K)
inline void check_unshuffle_bwd(const at::Tensor& grad_out, const at::Tensor& inv, int64_t P, int64_t K) {
  const char* op = "mae_fast.tokens_unshuffle_bwd";
  TORCH_CHECK_VALUE(grad_out.dim() == 3, op, ": grad_out must be 3-D, got shape ", grad_out.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(grad_out.scalar_type()), op, ": grad_out must be a float tensor, got ",
                   grad_out.scalar_type());
  check_inv(inv, grad_out.size(0), op);
  check_same_device(grad_out, inv, op, "inv");
  TORCH_CHECK_VALUE(P >= 0 && grad_out.size(1) == P + inv.size(1), op, ": grad_out.shape[1] must be num_prefix + ",
                    "num_patches = ", P + inv.size(1), ", got ", grad_out.size(1));
  TORCH_CHECK_VALUE(K >= 0 && K <= inv.size(1), op, ": num_keep must be in [0, num_patches], got ", K);
}

}  // namespace tokens
}  // namespace mae_fast
