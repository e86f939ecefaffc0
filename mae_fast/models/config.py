"""The constructor arguments of MaskedAutoencoderViT, checked before anything is built."""
from __future__ import annotations


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(*, img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
                 decoder_depth, decoder_num_heads, norm_pix_loss) -> None:
    """Constructor arguments of MaskedAutoencoderViT; errors name the argument and what it must be."""
    if not _is_int(patch_size) or patch_size < 1:
        raise (ValueError if _is_int(patch_size) else TypeError)(
            f"patch_size must be a positive int (square patches, as the official model), got {patch_size!r}")
    size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if len(size) != 2 or not all(_is_int(v) for v in size):
        raise TypeError(f"img_size must be an int or a pair of ints (H, W), got {img_size!r}")
    if min(size) < 1 or size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"img_size {size} must be positive and divisible by patch_size {patch_size}")
    for name, value, low in (("in_chans", in_chans, 1), ("embed_dim", embed_dim, 1), ("depth", depth, 0),
                             ("num_heads", num_heads, 1), ("decoder_embed_dim", decoder_embed_dim, 1),
                             ("decoder_depth", decoder_depth, 0), ("decoder_num_heads", decoder_num_heads, 1)):
        if not _is_int(value) or value < low:
            raise (ValueError if _is_int(value) else TypeError)(f"{name} must be an int >= {low}, got {value!r}")
    for dim_name, dim, heads_name, heads in (("embed_dim", embed_dim, "num_heads", num_heads),
                                             ("decoder_embed_dim", decoder_embed_dim, "decoder_num_heads",
                                              decoder_num_heads)):
        if dim % heads:
            raise ValueError(f"{dim_name} ({dim}) must be divisible by {heads_name} ({heads})")
        if dim % 4:
            raise ValueError(f"{dim_name} must be a multiple of 4 for the 2-D sin-cos table, got {dim}")
    if norm_pix_loss and patch_size * patch_size * in_chans < 2:
        raise ValueError("norm_pix_loss needs at least 2 values per patch (patch_size**2 * in_chans >= 2) "
                         "for the unbiased per-patch variance; got patch_size=1, in_chans=1")
