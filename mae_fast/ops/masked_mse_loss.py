# PLACEHOLDER (being replaced by the Triton op implementation): delegates to the eager reference.
from .. import reference as _ref


def masked_mse_loss(pred, imgs, patch_size, *, mask=None, ids=None, norm_pix=False):
    return _ref.masked_mse_loss(pred, imgs, patch_size, mask=mask, ids=ids, norm_pix_target=norm_pix)
