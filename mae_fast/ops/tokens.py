# PLACEHOLDER (being replaced by the C++/CUDA op implementation): delegates to the eager reference.
from .. import reference as _ref


def gather_tokens(x, ids):
    return _ref.gather_tokens(x, ids)


def unshuffle_tokens(visible, ids_keep, num_patches, mask_token, pos=None, *, num_prefix=0):
    return _ref.unshuffle_tokens(visible, ids_keep, num_patches, mask_token, pos, num_prefix)
