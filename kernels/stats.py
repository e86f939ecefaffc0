"""Row statistics shared by the norm-pix and LayerNorm kernels, finite wherever the exact ones are.

Rows whose largest magnitude passes 2**48 are scaled by 2**-80 (a power of two: exact) before their
sums: unscaled, the squares of values past ~2**64 overflow fp32 to inf, and the normalised row would
come out as 0 or NaN where the exact one is finite. Rows of up to 2**24 values then stay below
2**128 throughout; other rows are computed unscaled. mae_fast.ops._common.normalize_rows is the
PyTorch fallback's copy of these steps.
"""
import triton
import triton.language as tl

SCALE_ABOVE: tl.constexpr = tl.constexpr(2.0 ** 48)
SCALE: tl.constexpr = tl.constexpr(2.0 ** -80)
UNSCALE: tl.constexpr = tl.constexpr(2.0 ** 80)


@triton.jit
def normalize_rows(x, m, n, n_var, eps):
    """(y, mean, rstd) of the rows of x (R, BLOCK) fp32, whose elements outside the mask m are 0:
    y = (x - mean) * rstd (0 outside m), rstd = 1 / sqrt(var + eps), var = sum((x - mean)**2) / n_var,
    mean over the n elements in m. A constant row gets y = 0 and rstd = 1 / sqrt(eps) however large
    its values (eps * s * s underflows for a scaled row)."""
    big = tl.max(tl.abs(x), axis=1) > SCALE_ABOVE
    s = tl.where(big, SCALE, 1.0)
    u = x * s[:, None]
    mean = tl.sum(u, axis=1) / n
    d = tl.where(m, u - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / n_var
    flat = var == 0.0
    r = 1.0 / tl.sqrt(tl.where(flat, eps, var + eps * s * s))
    return d * r[:, None], tl.where(big, mean * UNSCALE, mean), tl.where(flat, r, r * s)
