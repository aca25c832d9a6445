"""A pixel classifier that gives the network a head start: the forest's idea, fitted in seconds.

On the CPU an ilastik-style pixel classifier (generic multiscale filters, a
classifier per voxel) learns from a few annotated slices in seconds, while a
3D U-Net needs minutes.  :class:`PixelClassifier` is such a classifier, small
and in torch: the filter bank of :mod:`napari_sparse3d.engine.features`,
standardised, then a bag of small perceptrons (each fitted on its own bootstrap
sample, their probabilities averaged, as a forest averages its trees).  It is fitted on the annotated
voxels that train (never the held-out ones) before the network's first step,
and its class probabilities become extra input channels of the U-Net, whose
output is added to their logarithm (:class:`~napari_sparse3d.engine.model.UNet3D`):
the untrained network predicts what the classifier predicts, and training
corrects it with the 3D context the classifier lacks (auto-context).

The classifier's weights are buffers of the network, so they travel in its
checkpoint and are not touched by the network's optimiser.  Its probabilities
are computed block by block with a margin (:func:`prior`), so a volume of any
size is covered in bounded memory and a block's values do not depend on how
the volume was cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_sparse3d.engine.features import block_boxes, feature_count, filter_bank, grow, halo, scaled_sigmas

__all__ = [
    "AS_IS", "PixelClassifier", "WithPrior", "checked_prior_map", "checked_sigmas", "prior", "probability_map",
    "training_samples",
]

HIDDEN = 64
MEMBERS = 4  # perceptrons in the bag, each on its own bootstrap sample (see PixelClassifier.fit)
FIT_STEPS = 600  # per perceptron (one perceptron: within 0.002 Dice of 1000 steps on the nuclei benchmark)
FIT_LR = 1e-2  # Adam's rate at the start, annealed to 0 by a cosine
FIT_BATCH = 8192
MAX_SAMPLES = 1_000_000  # annotated voxels kept for the fit (a random subset beyond that)
BLOCK_VOXELS = 1 << 21  # voxels per block of the filter bank (about 170 MB of responses per image channel)
PRIOR_BLOCK_VOXELS = 1 << 23  # the same for a prediction tile's input (benchmarks/bench_prior_memory.py)
MLP_CHUNK = 1 << 14  # voxels per pass of the perceptron on the CPU (its hidden activations: 4 MB, in cache)
MAX_SIGMA = 64.0  # voxels: a checkpoint's scale beyond it would make every block's margin and kernel absurd


def checked_sigmas(sigmas: Any) -> np.ndarray:
    """A checkpoint's ``pixel_head.sigmas`` as ``(scales, 3)`` float32, or a ``ValueError`` saying what is wrong."""
    array = np.asarray(sigmas.detach().cpu().numpy() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3 or not 1 <= array.shape[0] <= 16:
        raise ValueError(f"pixel_head.sigmas must have shape (scales, 3) with 1 to 16 scales, got {array.shape}")
    if not (np.isfinite(array).all() and (array > 0).all() and (array <= MAX_SIGMA).all()):
        raise ValueError(f"pixel_head.sigmas must be finite scales in (0, {MAX_SIGMA:g}] voxels, got {array.tolist()}")
    return array.astype(np.float32)


class PixelClassifier(nn.Module):
    """Filter bank + a bag of perceptrons from ``in_channels`` image channels to ``num_classes`` probabilities."""

    def __init__(
        self, in_channels: int, num_classes: int, spacing: Sequence[float] | None = None, *, sigmas: Any = None
    ) -> None:
        """``sigmas``: ``(scales, 3)`` per-axis scales in voxels (a checkpoint's); by default the bank's
        scales (:data:`~napari_sparse3d.engine.features.SIGMAS`) at ``spacing``."""
        super().__init__()
        self.num_classes = num_classes
        sigmas = scaled_sigmas(spacing) if sigmas is None else checked_sigmas(sigmas)
        n = feature_count(in_channels, len(sigmas))
        self.register_buffer("sigmas", torch.from_numpy(sigmas))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.float32))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        for name, shape in _member_shapes(n, num_classes).items():  # one row per perceptron of the bag
            self.register_buffer(name, torch.zeros((MEMBERS, *shape)))

    @property
    def halo(self) -> tuple[int, int, int]:
        return halo(self.sigmas.cpu().numpy())

    @property
    def members(self) -> int:
        return int(self.w1.shape[0])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints of earlier versions hold one perceptron (2-D weights): a bag of one.  The bag's
        size is the checkpoint's (1 to 16), so the buffers take its shape before torch copies them."""
        w1 = state_dict.get(prefix + "w1")
        if isinstance(w1, torch.Tensor):
            if w1.dim() == 2:
                for name in _member_shapes(1, 1):
                    if isinstance(state_dict.get(prefix + name), torch.Tensor):
                        state_dict[prefix + name] = state_dict[prefix + name].unsqueeze(0)
                w1 = state_dict[prefix + "w1"]
            if w1.dim() == 3 and 1 <= w1.shape[0] <= 16 and w1.shape[0] != self.members:
                for name in _member_shapes(1, 1):
                    buffer = getattr(self, name)
                    self._buffers[name] = buffer.new_zeros((w1.shape[0], *buffer.shape[1:]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def class_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., F)`` standardised features -> ``(..., K)`` probabilities: the bag's mean."""
        total = 0
        for m in range(self.members):
            h = F.relu(F.linear(x, self.w1[m], self.b1[m]))
            h = F.relu(F.linear(h, self.w2[m], self.b2[m]))
            total = total + F.linear(h, self.w3[m], self.b3[m]).softmax(-1)
        return total / self.members

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, F)`` standardised features -> ``(N, K)`` log-probabilities of the bag."""
        return self.class_probabilities(x).clamp_min(1e-12).log()

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(K, z, y, x)`` float32 class probabilities of a normalised image ``(C, z, y, x)``; uniform until fitted.

        The standardisation is folded into the first layer, and the perceptron runs over
        :data:`MLP_CHUNK` voxels at a time in the responses' own layout (features by
        voxels), so its hidden activations stay in the CPU's cache: on two CPU cores and
        a 60x256x256 volume, 1.0 s instead of 3.1 s for the same probabilities (to 1e-6).
        ``dtype`` ``torch.bfloat16`` runs the perceptrons' products in bfloat16 (the
        filters and the softmax stay float32), where the trainer's precision is bfloat16:
        on a CPU with native bfloat16 about 2.4x faster, probabilities within about 0.04
        (``benchmarks/results/head_precision.md``).
        """
        shape = tuple(image.shape[1:])
        if not bool(self.fitted):
            return torch.full((self.num_classes, *shape), 1.0 / self.num_classes, device=self.mean.device)
        with torch.autocast(self.mean.device.type, enabled=False):
            feats = filter_bank(image.to(self.mean.device), self.sigmas.cpu().numpy()).reshape(self.mean.numel(), -1)
            w1 = self.w1 / self.std[None, None, :]
            b1 = (self.b1 - (w1 @ self.mean))[:, :, None]
            b2, b3 = self.b2[:, :, None], self.b3[:, :, None]
            low = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
            w1, b1, w2, b2, w3, b3 = (t.to(low) for t in (w1, b1, self.w2, b2, self.w3, b3))
            out = torch.empty((self.num_classes, feats.shape[1]), device=feats.device)
            chunk = MLP_CHUNK if feats.device.type == "cpu" else 64 * MLP_CHUNK  # a GPU wants fewer, larger launches
            for start in range(0, feats.shape[1], chunk):
                part = feats[:, start : start + chunk].to(low)
                total = torch.zeros((self.num_classes, part.shape[1]), device=feats.device)
                for m in range(self.members):
                    hidden = torch.addmm(b1[m], w1[m], part).relu_()
                    hidden = torch.addmm(b2[m], w2[m], hidden).relu_()
                    total += torch.addmm(b3[m], w3[m], hidden).float().softmax(0)
                out[:, start : start + chunk] = total.div_(self.members)
        return out.reshape(self.num_classes, *shape)

    def fit(
        self, features: torch.Tensor, labels: torch.Tensor, *, seed: int, steps: int = FIT_STEPS,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Fit on ``(N, F)`` raw responses with class indices ``(N,)``: a bag of :data:`MEMBERS` perceptrons.

        Each perceptron learns from its own bootstrap sample of the voxels (``steps`` Adam
        steps of cross-entropy, the rate annealed from :data:`FIT_LR` to 0 by a cosine), and the
        classifier's probabilities are their mean: the forest's remedy for a learner that
        either underfits or learns the noise, whichever the volume invites
        (``benchmarks/bench_classifier.py``, variant ``bag4-cosine-1e-2``; README).

        ``dtype`` ``torch.bfloat16`` fits under bfloat16 autocast (float32 weights and
        optimiser): where the hardware has bfloat16 (the trainer's precision says so) the
        fit takes about 0.6x the time (``benchmarks/results/classifier_bf16_fit.md``).  A member whose
        bfloat16 fit ends with non-finite weights is fitted again in float32.
        """
        device = self.mean.device
        if labels.numel() == 0:
            self.fitted.zero_()
            return
        if not bool(torch.isfinite(features).all()):
            raise ValueError("image: the annotated region holds NaN or infinite values; the pixel classifier cannot"
                             " learn from it (replace them, e.g. with numpy.nan_to_num)")
        features, labels = features.to(device), labels.to(device)
        mean, std = features.mean(0), features.std(0) + 1e-6
        draw = torch.Generator().manual_seed(int(seed))
        fitted = []
        for m in range(self.members):
            pick = torch.randint(0, labels.numel(), (labels.numel(),), generator=draw).to(device)
            args = (features.index_select(0, pick), labels.index_select(0, pick), self.num_classes,
                    int(seed) * self.members + m, steps)
            member = _fit_member(*args, dtype=dtype)
            if dtype != torch.float32 and not all(bool(torch.isfinite(p).all()) for n in member[2] for p in n.parameters()):
                member = _fit_member(*args, dtype=torch.float32)
            fitted.append(member)
        with torch.no_grad():
            self.mean.copy_(mean)
            self.std.copy_(std)
            for m, (own_mean, own_std, layers) in enumerate(fitted):
                # the member standardised with its sample's statistics: the same function of the shared ones
                ratio = std / own_std
                self.w1[m].copy_(layers[0].weight * ratio[None, :])
                self.b1[m].copy_(layers[0].bias + layers[0].weight @ ((mean - own_mean) / own_std))
                for name, value in (("w2", layers[1].weight), ("b2", layers[1].bias),
                                    ("w3", layers[2].weight), ("b3", layers[2].bias)):
                    getattr(self, name)[m].copy_(value)
            self.fitted.fill_(1.0)


def _member_shapes(features: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    return {"w1": (HIDDEN, features), "b1": (HIDDEN,), "w2": (HIDDEN, HIDDEN), "b2": (HIDDEN,),
            "w3": (num_classes, HIDDEN), "b3": (num_classes,)}


def _fit_member(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, steps: int, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, list[nn.Linear]]:
    """One perceptron of the bag on its sample: its standardisation and its three layers (see ``fit``)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        layers = [nn.Linear(x.shape[1], HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, num_classes)]
    net = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2]).to(x.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=FIT_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    low = dtype == torch.bfloat16
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        for _ in range(steps):
            index = torch.randint(0, y.numel(), (min(FIT_BATCH, y.numel()),), generator=generator).to(x.device)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
                # index_select: 4x faster than x[index] for this gather, the same values
                loss = F.cross_entropy(net((x.index_select(0, index) - mean) / std), y.index_select(0, index))
            if low:  # autocast keeps its bfloat16 copies of the weights until its outermost context exits
                torch.clear_autocast_cache()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return mean, std, layers


def _normalised(volume: Any, normalization: Any, box: tuple[slice, ...], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(normalization.apply(volume.read(box)), dtype=np.float32)).to(device)


def _prior_block(
    head: PixelClassifier, volume: Any, normalization: Any, box: tuple[slice, ...], dtype: torch.dtype
) -> torch.Tensor:
    grown, inner = grow(box, head.halo, volume.spatial_shape)
    return head.probabilities(_normalised(volume, normalization, grown, head.mean.device), dtype)[(slice(None), *inner)]


def prior(
    head: PixelClassifier, volume: Any, normalization: Any, box: tuple[slice, ...], *,
    block_voxels: int = PRIOR_BLOCK_VOXELS, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The classifier's probabilities ``(K, z, y, x)`` float32 on ``box`` of ``volume``.

    Computed block by block, each block of at most ``block_voxels`` read with its own margin,
    so that memory does not grow with the box (a prediction tile with its windows' margins
    can hold 30 M voxels, and the filter bank keeps about 30 floats per voxel).  ``dtype``
    as for :meth:`PixelClassifier.probabilities`.
    """
    shape = tuple(b.stop - b.start for b in box)
    blocks = block_boxes(shape, block_voxels)
    if len(blocks) == 1:
        return _prior_block(head, volume, normalization, box, dtype)
    out = torch.empty((head.num_classes, *shape), dtype=torch.float32, device=head.mean.device)
    for sub in blocks:
        where = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub))
        out[(slice(None), *sub)] = _prior_block(head, volume, normalization, where, dtype)
    return out


def probability_map(
    head: PixelClassifier, volume: Any, normalization: Any, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """The classifier's probabilities over the whole volume, ``(K, Z, Y, X)`` float16, block by block."""
    out = np.empty((head.num_classes, *volume.spatial_shape), dtype=np.float16)
    for box in block_boxes(volume.spatial_shape, BLOCK_VOXELS):
        # cast by torch: numpy's cast of values below float16's normal range (most of these) is 600x slower
        torch.from_numpy(out)[(slice(None), *box)].copy_(_prior_block(head, volume, normalization, box, dtype).cpu())
    return out


def checked_prior_map(prior_map: Any, channels: int, shape: Sequence[int]) -> Any:
    """``prior_map`` (the classifier's probabilities, ``(channels, *shape)``, floating point) or ``None``; else an error."""
    if prior_map is None:
        return None
    given = tuple(getattr(prior_map, "shape", ()))
    if channels == 0:
        raise ValueError(f"prior_map: the model has no pixel classifier to take probabilities from; got shape {given}")
    expected = (channels, *map(int, shape))
    if given != expected:
        raise ValueError(f"prior_map must have shape (classes, z, y, x) = {expected}, got {given or type(prior_map).__name__}")
    if not np.issubdtype(np.dtype(prior_map.dtype), np.floating):
        raise TypeError(f"prior_map must hold floating-point probabilities, got dtype {prior_map.dtype}")
    return prior_map


def training_samples(
    head: PixelClassifier, items: Sequence[tuple[Any, Any, np.ndarray]], *, seed: int, max_samples: int = MAX_SAMPLES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw responses ``(N, F)`` and class indices ``(N,)`` of the training voxels (``target >= 0``) of each item.

    ``items`` are ``(volume, normalization, target)``; only blocks holding training
    voxels are filtered, and beyond ``max_samples`` voxels a random subset is kept.
    """
    rng = np.random.default_rng(seed)
    total = sum(int((t >= 0).sum()) for _, _, t in items)
    keep = min(1.0, max_samples / max(total, 1))
    xs, ys = [], []
    for volume, normalization, target in items:
        for box in block_boxes(volume.spatial_shape, BLOCK_VOXELS):
            labels = target[box]
            where = np.flatnonzero(labels >= 0)
            if keep < 1.0:
                where = where[rng.random(where.size) < keep]
            if where.size == 0:
                continue
            grown, inner = grow(box, head.halo, volume.spatial_shape)
            with torch.no_grad():
                feats = filter_bank(_normalised(volume, normalization, grown, head.mean.device), head.sigmas.cpu().numpy())
            feats = feats[(slice(None), *inner)].reshape(feats.shape[0], -1)
            index = torch.from_numpy(where).to(feats.device)
            xs.append(feats[:, index].T.cpu())
            ys.append(torch.from_numpy(labels.reshape(-1)[where].astype(np.int64)))
    if not xs:
        return torch.zeros((0, head.mean.numel())), torch.zeros(0, dtype=torch.int64)
    return torch.cat(xs), torch.cat(ys)


class _AsIs:
    """A normalisation that leaves blocks as they are (they come normalised from :class:`WithPrior`)."""

    @staticmethod
    def apply(block: np.ndarray) -> np.ndarray:
        return block


AS_IS = _AsIs()


class WithPrior:
    """A training volume read normalised, with the classifier's probabilities as extra channels.

    Reads like a volume (``read``, ``spatial_shape``, ``channels``); pair it with
    :data:`AS_IS` where a normalisation is expected.  ``probabilities`` is replaced
    in place when the classifier is fitted again.
    """

    def __init__(self, volume: Any, normalization: Any, probabilities: np.ndarray) -> None:
        self.volume, self.normalization, self.probabilities = volume, normalization, probabilities
        self.spatial_shape = tuple(volume.spatial_shape)
        self.channels = volume.channels + probabilities.shape[0]
        self.shape = (self.channels, *self.spatial_shape)

    def read(self, region: tuple[slice, ...] | None = None) -> np.ndarray:
        region = tuple(region) if region is not None else (slice(None),) * 3
        image = self.normalization.apply(self.volume.read(region))
        probs = np.asarray(self.probabilities[(slice(None), *region)], dtype=np.float32)
        return np.concatenate([np.asarray(image, dtype=np.float32), probs])
