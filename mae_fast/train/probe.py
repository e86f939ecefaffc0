"""Linear probe of a frozen MAE encoder on scikit-learn's bundled digits.

Features: the encoder's normalised tokens on the whole (unmasked) image, averaged over patches.
A logistic regression on standardised features is fit on a fixed split; the same is done for a
randomly initialised encoder of the same shape, so the number has a baseline beside it.
"""
from __future__ import annotations

import torch

from .. import data as mdata


@torch.no_grad()
def encode(model, imgs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean of the final encoder tokens over all patches (no masking): (N, embed_dim)."""
    model.eval()
    return torch.cat([model.forward_features(chunk)[:, 1:].mean(dim=1) for chunk in imgs.split(batch_size)])


def probe_accuracy(model, seed: int = 0) -> float:
    """Test accuracy of a logistic regression on the frozen features (digits, fixed split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    imgs, labels = mdata.digits(tuple(model.img_size), model.in_chans)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.6 * len(labels))
    feats = encode(model, imgs).numpy()
    train, test = perm[:n_train].numpy(), perm[n_train:].numpy()
    scaler = StandardScaler().fit(feats[train])
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(feats[train]), labels[train].numpy())
    return float(clf.score(scaler.transform(feats[test]), labels[test].numpy()))

