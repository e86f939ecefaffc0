# PLACEHOLDER (being replaced by the Triton op implementation): delegates to the eager reference.
from .. import reference as _ref


def patchify(imgs, patch_size):
    return _ref.patchify(imgs, patch_size)


def unpatchify(x, patch_size, image_size):
    return _ref.unpatchify(x, patch_size, image_size)


def patchify_gather(imgs, ids, patch_size, *, norm_pix=False):
    return _ref.patchify_gather(imgs, ids, patch_size, norm_pix_target=norm_pix)
