"""The 3D U-Net of Çiçek et al. (2016), built from per-level lists.

Each level of the encoder has two convolutions (normalisation + activation
after each); levels are joined by max pooling or a strided convolution with
a per-level stride, so an anisotropic axis is configuration rather than
code (nnU-Net's planning).  The decoder mirrors the encoder: upsampling by
transposed convolution or trilinear interpolation, concatenation with the
skip connection, two convolutions.  Convolutions are padded, so the output
has the size of the input (which must be divisible by the product of the
strides).  The network returns logits; with deep supervision it returns,
while training, a list of logits from the finest to the coarsest decoder
level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from napari_sparse3d.config import ModelConfig
from napari_sparse3d.engine.pixel_head import PixelClassifier
from napari_sparse3d.engine.volume import Triple, int3

if TYPE_CHECKING:  # the record of a trained network; engine.trained builds networks, so not imported at run time
    from napari_sparse3d.engine.trained import ModelInfo

__all__ = ["UNet3D", "build_model", "plan_levels"]



def plan_levels(levels: int, spacing: Sequence[float] | None) -> tuple[list[Triple], list[Triple]]:
    """Kernel sizes (one per level) and strides (one per downsampling) for a voxel spacing.

    Following nnU-Net: an axis whose voxel size is more than twice the finest
    current voxel size is neither pooled nor convolved across (kernel 1) until
    pooling the other axes has made the voxels comparable.
    """
    current = [float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0))]
    kernels: list[Triple] = []
    strides: list[Triple] = []
    for level in range(levels):
        finest = min(current)
        coarse = [s > 2 * finest for s in current]
        kernels.append(int3(1 if c else 3 for c in coarse))
        if level < levels - 1:
            stride = int3(1 if c else 2 for c in coarse)
            strides.append(stride)
            current = [s * st for s, st in zip(current, stride)]
    return kernels, strides


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that leaves CPU bfloat16 autocast where oneDNN's kernels are wrong.

    On the CPU, oneDNN's bfloat16 weight-gradient kernel for 3D convolutions
    returns garbage (different on every call, sometimes inf or NaN) when the
    input is smaller than the kernel along an axis — e.g. a bottleneck two
    voxels deep under a 3x3x3 kernel, which a 16-voxel-deep patch reaches
    after three poolings (``benchmarks/bench_robustness.py``; the float32 and
    the input-gradient kernels are exact).  Such a layer holds a few hundred
    voxels, so computing it in float32 costs nothing measurable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and any(
            s < k for s, k in zip(x.shape[2:], self.kernel_size)
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class InstanceNorm3d(nn.InstanceNorm3d):
    """Instance normalisation (affine, no running statistics), computed as a group norm of one channel per group.

    The two are the same function with the same parameters (checkpoints are
    interchangeable), but ``instance_norm`` copies a ``channels_last_3d`` input
    to the contiguous layout and back, forward and backward, while
    ``group_norm`` has kernels for both layouts: a training step on the CPU is
    about 10% faster (``benchmarks/bench_step.py``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)):
            # torch's channels-last group norm in bfloat16 is 3-25x slower on the CPU than the same
            # norm on a contiguous copy, converted back: about half of a prediction's forward pass,
            # and a training step takes 53 ms instead of 141 ms (benchmarks/results/prediction_bf16.md,
            # norm_bf16.md)
            y = F.group_norm(x.contiguous(), self.num_features, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last_3d)
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return InstanceNorm3d(channels, affine=True, eps=1e-5)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


def _act(kind: str) -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True) if kind == "leaky_relu" else nn.ReLU(inplace=True)


class ConvBlock(nn.Sequential):
    """Two padded convolutions, each followed by normalisation and activation."""

    def __init__(self, cin: int, cout: int, kernel: Triple, norm: str, act: str, first_stride: Triple = (1, 1, 1)):
        pad = tuple(k // 2 for k in kernel)
        bias = norm == "none"
        super().__init__(
            Conv3d(cin, cout, kernel, stride=first_stride, padding=pad, bias=bias),
            _norm(norm, cout),
            _act(act),
            Conv3d(cout, cout, kernel, padding=pad, bias=bias),
            _norm(norm, cout),
            _act(act),
        )


class UNet3D(nn.Module):
    """3D U-Net: ``(N, in_channels, z, y, x) -> (N, num_classes, z, y, x)`` logits.

    Parameters
    ----------
    in_channels, num_classes : int
        Image channels in, classes out.
    config : ModelConfig
        Architecture; see :class:`napari_sparse3d.config.ModelConfig`.
    spacing : sequence of 3 floats, optional
        Voxel size (z, y, x), used to plan anisotropic kernels and strides when
        the configuration does not give them.

    A trained network carries what is needed to use it as ``sparse3d`` (a
    :class:`~napari_sparse3d.engine.trained.ModelInfo`); a fresh one has ``None``.
    """

    sparse3d: ModelInfo | None

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        config: ModelConfig | None = None,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.sparse3d = None
        config = config or ModelConfig()
        kernels, strides = plan_levels(config.levels, spacing)
        self.kernel_sizes: list[Triple] = list(config.kernel_sizes or kernels)
        self.strides: list[Triple] = list(config.strides or strides)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.deep_supervision = config.deep_supervision
        features = [min(config.base_features * 2**i, config.max_features) for i in range(config.levels)]
        self.features = features
        # with a pixel classifier the input is (image, classifier probabilities); see forward
        self.pixel_head = PixelClassifier(in_channels, num_classes, spacing) if config.pixel_classifier else None
        self.prior_channels = num_classes if self.pixel_head is not None else 0

        self.encoder = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        cin = in_channels + self.prior_channels
        for level, (f, k) in enumerate(zip(features, self.kernel_sizes)):
            if level > 0:
                stride = self.strides[level - 1]
                if config.downsample == "maxpool":
                    self.downsamplers.append(nn.MaxPool3d(stride, stride))
                    self.encoder.append(ConvBlock(cin, f, k, config.norm, config.activation))
                else:  # the strided convolution is the block's first convolution
                    self.downsamplers.append(nn.Identity())
                    self.encoder.append(ConvBlock(cin, f, k, config.norm, config.activation, first_stride=stride))
            else:
                self.encoder.append(ConvBlock(cin, f, k, config.norm, config.activation))
            cin = f

        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in range(config.levels - 2, -1, -1):
            stride = self.strides[level]
            deep, skip = features[level + 1], features[level]
            if config.upsample == "transpose":
                self.upsamplers.append(nn.ConvTranspose3d(deep, skip, stride, stride, bias=False))
            else:
                self.upsamplers.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=stride, mode="trilinear", align_corners=False),
                        nn.Conv3d(deep, skip, 1, bias=False),
                    )
                )
            self.decoder.append(ConvBlock(2 * skip, skip, self.kernel_sizes[level], config.norm, config.activation))
            self.heads.append(nn.Conv3d(skip, num_classes, 1))
        self._init_weights(config.activation)

    def _init_weights(self, activation: str) -> None:
        slope = 0.01 if activation == "leaky_relu" else 0.0
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=slope)  # He initialisation, as in U-Net
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.pixel_head is not None:  # the untrained network predicts the classifier's prior
            nn.init.zeros_(self.heads[-1].weight)
            nn.init.zeros_(self.heads[-1].bias)

    def scale_factors(self) -> list[Triple]:
        """Per decoder output (finest first): how much coarser than the input it is, per axis."""
        factors: list[Triple] = []
        z = y = x = 1
        for sz, sy, sx in self.strides:
            z, y, x = z * sz, y * sy, x * sx
            factors.append((z, y, x))
        return factors

    @property
    def divisor(self) -> Triple:
        """Input sizes must be multiples of this (the product of the strides per axis)."""
        return self.scale_factors()[-1] if self.strides else (1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``x``: ``(N, in_channels + prior_channels, z, y, x)``, the normalised image followed, with a
        pixel classifier, by its class probabilities, whose logarithm is added to the finest output."""
        prior = None
        if self.prior_channels:
            prior = torch.log(x[:, -self.prior_channels :].float().clamp_min(1e-4))
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = self.downsamplers[level - 1](x)
            x = block(x)
            skips.append(x)
        outputs = []
        for i, (up, block, head) in enumerate(zip(self.upsamplers, self.decoder, self.heads)):
            x = up(x)
            x = block(torch.cat([skips[-2 - i], x], dim=1))
            if self.deep_supervision and self.training:
                outputs.append(head(x))
        if self.deep_supervision and self.training:
            if prior is not None:
                outputs[-1] = outputs[-1] + prior
            return outputs[::-1]  # finest first
        out = self.heads[-1](x)
        return out + prior if prior is not None else out


def build_model(in_channels: int, num_classes: int, config: ModelConfig, spacing: Sequence[float] | None) -> UNet3D:
    """Build the network a configuration describes (used for training and for loading checkpoints)."""
    return UNet3D(in_channels, num_classes, config, spacing)
