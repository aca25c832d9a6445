"""Losses over an explicit weight map.

Unlabeled voxels carry weight 0: they contribute nothing to the loss and so
nothing to the gradients (the 3D U-Net paper's weighted cross-entropy).  The
logits are never masked or zeroed; only the weights are.  Every reduction is
``sum(w * l) / max(sum(w), eps)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["SparseLoss", "downsample_targets", "soft_dice_loss", "weighted_cross_entropy"]

_EPS = 1e-6


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with a per-voxel weight.

    Parameters
    ----------
    logits : (N, K, ...) tensor
    target : (N, ...) int64 class indices, or (N, K, ...) soft targets (probabilities)
    weight : (N, ...) float; 0 on unlabeled voxels, where ``target`` may hold anything.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    if target.dim() == logits.dim():
        per_voxel = -(target * logp).sum(dim=1)
    else:
        safe = target.clamp(0, logits.shape[1] - 1)  # the value under weight 0 is irrelevant
        per_voxel = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    return (weight * per_voxel).sum() / weight.sum().clamp_min(_EPS)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    classes: Sequence[int] | None = None,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """1 - soft Dice over the labeled voxels of the whole batch ("batch Dice").

    ``mask`` (N, ...) is 1 on labeled voxels; ``classes`` picks the channels
    averaged (for example the foreground ones).  A class absent from the
    labels within the mask scores a Dice of about 0 whatever the prediction
    (``smooth / (sum of its probabilities + smooth)``): it adds an almost
    constant 1 to that class's loss and almost no gradient.  Pooling the
    whole batch makes a class absent from every patch rare.
    """
    probs = torch.softmax(logits.float(), dim=1)
    if target.dim() == logits.dim():
        onehot = target.float()
    else:
        onehot = F.one_hot(target.clamp(0, logits.shape[1] - 1), logits.shape[1]).movedim(-1, 1).float()
    m = mask.unsqueeze(1).float()
    dims = [0] + list(range(2, logits.dim()))
    inter = (probs * onehot * m).sum(dims)
    denom = (probs * m).sum(dims) + (onehot * m).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if classes is not None:
        dice = dice[list(classes)]
    return 1 - dice.mean()


def downsample_targets(
    target: torch.Tensor, weight: torch.Tensor, num_classes: int, factor: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights at a coarser scale, for deep supervision.

    Sparse labels cannot be subsampled by striding (a thin annotated plane
    would vanish); instead each coarse voxel gets the weighted class mix of
    the fine voxels it covers as a soft target, and their mean weight.
    """
    factor = tuple(int(f) for f in factor)
    onehot = F.one_hot(target.clamp(0, num_classes - 1), num_classes).movedim(-1, 1).float()
    w = weight.unsqueeze(1).float()
    pooled_w = F.avg_pool3d(w, factor, factor)
    soft = F.avg_pool3d(onehot * w, factor, factor) / pooled_w.clamp_min(_EPS)
    return soft, pooled_w.squeeze(1)


class SparseLoss:
    """Weighted cross-entropy plus (optionally) soft Dice, with deep supervision.

    Parameters
    ----------
    num_classes : int
    dice_weight : float
        Weight of the soft Dice term; 0 gives pure weighted cross-entropy.
    dice_classes : sequence of int, optional
        Channels the Dice term averages over (default: all).
    scale_factors : list of (z, y, x), optional
        For deep supervision: the downsampling of each output after the first
        relative to the input; outputs are weighted 1, 1/2, 1/4, ... (normalised).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        dice_weight: float = 1.0,
        dice_classes: Sequence[int] | None = None,
        scale_factors: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.dice_weight = dice_weight
        self.dice_classes = dice_classes
        self.scale_factors = [tuple(f) for f in (scale_factors or [])]

    def _single(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        loss = weighted_cross_entropy(logits, target, weight)
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, weight > 0, self.dice_classes)
        return loss

    def __call__(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self._single(outputs, target, weight)
        if len(outputs) - 1 > len(self.scale_factors):
            raise ValueError(f"got {len(outputs)} outputs but only {len(self.scale_factors)} scale factors")
        level_weights = [0.5**i for i in range(len(outputs))]
        total = sum(level_weights)
        loss = level_weights[0] * self._single(outputs[0], target, weight)
        for lw, out, factor in zip(level_weights[1:], outputs[1:], self.scale_factors):
            soft, w = downsample_targets(target, weight, self.num_classes, factor)
            loss = loss + lw * self._single(out, soft, w)
        return loss / total
