"""The network as a model package runs it (bioimage.io): a normalised image in, class probabilities out.

:class:`ExportedUNet` wraps a trained :class:`~napari_sparse3d.engine.model.UNet3D`
so that one call does what napari-sparse3d's prediction does for one window:
the pixel classifier's probabilities are computed from the image (its filter
bank, batched over samples and channels, with replicated borders: a consumer
tiles with the halo the package declares), joined to the image as channels,
and the network's logits become softmax probabilities.  Its constructor takes
plain values only (YAML in a package), and its state dict is the network's
under ``net.``, so ``pytorch_state_dict`` weights load into it strictly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_sparse3d.config import Config
from napari_sparse3d.engine.features import filter_bank
from napari_sparse3d.engine.model import UNet3D, build_model

__all__ = ["ExportedUNet", "torch_version", "write_weights"]


class ExportedUNet(nn.Module):
    """``(N, C, z, y, x)`` normalised image -> ``(N, K, z, y, x)`` class probabilities (see the module docstring).

    Parameters
    ----------
    in_channels, num_classes : int
    model : mapping, optional
        The ``model`` section of the configuration (:class:`~napari_sparse3d.config.ModelConfig` fields).
    spacing : (z, y, x), optional
        The training voxel size (it shapes kernels, strides and the classifier's scales).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        model: Mapping[str, Any] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        config = Config.from_dict({"model": dict(model or {})}).model
        self.net: UNet3D = build_model(int(in_channels), int(num_classes), config, None if spacing is None else tuple(spacing))
        self.net.eval()

    @classmethod
    def wrapping(cls, net: UNet3D, kwargs: Mapping[str, Any]) -> ExportedUNet:
        """The wrapper of a trained ``net`` (built from ``kwargs``, then loaded with its weights)."""
        wrapper = cls(**kwargs)
        wrapper.net.load_state_dict(net.state_dict())
        return wrapper.eval()

    def _prior(self, x: torch.Tensor) -> torch.Tensor:
        head = self.net.pixel_head
        assert head is not None
        n, c = x.shape[0], x.shape[1]
        spatial = x.shape[2:]
        if not bool(head.fitted):
            return torch.full((n, head.num_classes, *spatial), 1.0 / head.num_classes, dtype=x.dtype, device=x.device)
        # samples and channels side by side in the bank's channel axis: per sample, channel-major, as in training
        feats = filter_bank(x.reshape(n * c, *spatial), head.sigmas.cpu().numpy()).reshape(n, -1, *spatial)
        feats = (feats - head.mean.view(1, -1, 1, 1, 1)) / head.std.view(1, -1, 1, 1, 1)
        return head.logits(feats.movedim(1, -1)).softmax(-1).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.net.pixel_head is not None:
            x = torch.cat([x, self._prior(x)], dim=1)
        return torch.softmax(self.net(x).float(), dim=1)


def torch_version() -> str:
    return torch.__version__.split("+")[0]


def write_weights(wrapper: ExportedUNet, normalised: np.ndarray, folder: Path) -> np.ndarray:
    """Write ``weights.pt`` (state dict) and ``weights_torchscript.pt`` into ``folder``; the output on ``normalised``."""
    example = torch.from_numpy(np.ascontiguousarray(normalised, dtype=np.float32))
    with torch.no_grad():
        probabilities = wrapper(example).numpy()
    torch.save(wrapper.state_dict(), folder / "weights.pt")
    with torch.no_grad(), warnings.catch_warnings():
        # what the tracer freezes does not depend on the input's size (the classifier's scales and
        # kernels, shape checks); bioimageio.core's model test runs the traced network at three sizes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    traced.save(str(folder / "weights_torchscript.pt"))
    return probabilities
