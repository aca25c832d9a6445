"""One configuration object for the engine: nested frozen dataclasses.

The configuration is validated once, when it is built, and round-trips through
JSON so that it can travel inside every checkpoint.  Presets give sensible
starting points; ``Config.from_preset("fast", train={"batch_size": 4})``
overrides single fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_LEVELS", "PRESETS", "Config", "ModelConfig", "PredictConfig", "TrainConfig", "default_preset", "resolve_config"]


MAX_LEVELS = 8  # of the U-Net: strides of up to 2**7 voxels


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    name = f"config.{name}"
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    name = f"config.{name}"
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):  # NaN passes every comparison below
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _check_at_most(name: str, value: Any, limit: int) -> None:
    if value > limit:
        raise ValueError(f"config.{name} must be <= {limit}, got {value!r}")


def _check_flags(section: str, config: Any) -> None:
    """Every ``bool`` field of a section holds a bool (JSON ``true``/``false``), not a string or a number."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("bool", bool) and not isinstance(value, bool):
            raise TypeError(f"config.{section}.{f.name} must be true or false, got {value!r}")


def _triple(name: str, value: Any) -> tuple[int, int, int] | None:
    name = f"config.{name}"
    if value is None:
        return None
    value = tuple(value)
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{name} must be three positive integers (z, y, x), got {value!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the 3D U-Net.

    Kernel sizes and strides per level are derived from the voxel spacing
    (see :func:`napari_sparse3d.model.plan_levels`) unless given explicitly.
    """

    levels: int = 4
    base_features: int = 8
    max_features: int = 256
    norm: str = "instance"  # "instance" | "batch" | "none"
    activation: str = "leaky_relu"  # "leaky_relu" | "relu"
    downsample: str = "maxpool"  # "maxpool" | "conv" (strided convolution)
    upsample: str = "transpose"  # "transpose" | "trilinear"
    deep_supervision: bool = True
    # a pixel classifier on multiscale filters (engine/pixel_head.py), fitted in seconds on the annotated
    # voxels; its probabilities are extra inputs of the network and the prior its output corrects
    pixel_classifier: bool = True
    kernel_sizes: tuple[tuple[int, int, int], ...] | None = None
    strides: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        _check_positive("model.levels", self.levels, integer=True)
        # each level halves the volume along some axes: beyond 8 a patch is hundreds of voxels a side
        _check_at_most("model.levels", self.levels, MAX_LEVELS)
        _check_flags("model", self)
        _check_positive("model.base_features", self.base_features, integer=True)
        _check_positive("model.max_features", self.max_features, integer=True)
        _check_choice("model.norm", self.norm, ("instance", "batch", "none"))
        _check_choice("model.activation", self.activation, ("leaky_relu", "relu"))
        _check_choice("model.downsample", self.downsample, ("maxpool", "conv"))
        _check_choice("model.upsample", self.upsample, ("transpose", "trilinear"))
        for name in ("kernel_sizes", "strides"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(_triple(f"model.{name}[{i}]", v) for i, v in enumerate(value))
            object.__setattr__(self, name, value)
        if self.kernel_sizes is not None and len(self.kernel_sizes) != self.levels:
            raise ValueError(
                f"config.model.kernel_sizes must have one entry per level ({self.levels}), got {len(self.kernel_sizes)}"
            )
        if self.strides is not None and len(self.strides) != self.levels - 1:
            raise ValueError(
                f"config.model.strides must have one entry per downsampling ({self.levels - 1}), got {len(self.strides)}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """How the network is trained from sparse annotations."""

    patch_size: tuple[int, int, int] | None = None  # None: planned from volume and spacing
    patch_voxels: int = 32**3  # target size of a planned patch
    flatten_patches: bool = True  # flatten planned patches along the normal of the most-annotated slices
    # grow planned patches (and cut the batch) when the annotated objects are larger than a patch
    # (engine/objects.py: context_plan); small objects keep patch_voxels
    plan_from_objects: bool = True
    batch_size: int = 4
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    lr_schedule: str = "poly"  # "poly" (decays to the budget) | "constant"
    grad_clip: float = 12.0
    dice_weight: float = 1.0  # soft Dice added to cross-entropy; 0 disables it
    # "none" | "sqrt" | "inverse": cross-entropy weights from annotated class frequencies.  The Dice
    # term already balances classes; extra weights made thin classes over-segmented (measured).
    class_balance: str = "none"
    foreground_fraction: float = 1 / 3  # share of patches centred on a foreground voxel
    flip: bool = True
    rotate90: bool = True
    intensity: bool = True
    # the 3D U-Net paper's spatial augmentation, one grid_sample per batch (engine/deform.py): a smooth
    # elastic B-spline deformation (displacement sigma in voxels on a grid of control points), arbitrary
    # rotation (degrees; about z only for anisotropic voxels) and isotropic scaling
    elastic: bool = False
    elastic_sigma: float = 4.0
    elastic_grid: int = 32
    rotate: bool = False
    rotate_degrees: float = 30.0
    scale: bool = False
    scale_range: float = 0.15  # zoom factors in [1 - r, 1 + r]
    spatial_probability: float = 0.5  # share of patches that get the spatial transform
    # "image": every image is clipped to its own 0.5/99.5 percentiles and z-scored (nnU-Net's choice for
    # non-CT data; models transfer to new volumes of another brightness); "dataset": the training images'
    # statistics are stored and applied to every image (intensities calibrated across volumes, e.g. CT)
    normalization: str = "image"
    # share of the annotated voxels held out for a validation Dice (0: none); see engine/validation.py
    validation: float = 0.1
    validation_every: int = 25  # steps between validation Dice measurements
    precision: str = "auto"  # "auto" | "bf16" | "fp16" | "fp32"
    channels_last: bool = True
    # draw the next batch in a background thread: worth it where CPU cores are free (GPU training);
    # on a 2-core CPU the thread competes with the convolutions and costs steps (measured)
    prefetch: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", _triple("train.patch_size", self.patch_size))
        _check_positive("train.patch_voxels", self.patch_voxels, integer=True)
        _check_positive("train.batch_size", self.batch_size, integer=True)
        _check_positive("train.learning_rate", self.learning_rate)
        _check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train.warmup_steps", self.warmup_steps, integer=True, allow_zero=True)
        _check_choice("train.lr_schedule", self.lr_schedule, ("poly", "constant"))
        _check_flags("train", self)
        _check_positive("train.grad_clip", self.grad_clip)
        _check_positive("train.dice_weight", self.dice_weight, allow_zero=True)
        _check_choice("train.class_balance", self.class_balance, ("none", "sqrt", "inverse"))
        _check_positive("train.foreground_fraction", self.foreground_fraction, allow_zero=True)
        if self.foreground_fraction > 1:
            raise ValueError(f"config.train.foreground_fraction must be <= 1, got {self.foreground_fraction!r}")
        _check_choice("train.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _check_positive("train.elastic_sigma", self.elastic_sigma, allow_zero=True)
        _check_positive("train.elastic_grid", self.elastic_grid, integer=True)
        _check_positive("train.rotate_degrees", self.rotate_degrees, allow_zero=True)
        _check_positive("train.scale_range", self.scale_range, allow_zero=True)
        if self.scale_range >= 1:
            raise ValueError(f"config.train.scale_range must be < 1, got {self.scale_range!r}")
        for name in ("spatial_probability", "validation"):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
            if getattr(self, name) > 1:
                raise ValueError(f"config.train.{name} must be <= 1, got {getattr(self, name)!r}")
        _check_choice("train.normalization", self.normalization, ("image", "dataset"))
        _check_positive("train.validation_every", self.validation_every, integer=True)


@dataclass(frozen=True)
class PredictConfig:
    """Sliding-window prediction (``benchmarks/bench_prediction.py`` measured the defaults)."""

    # Defaults measured on trained nuclei models (benchmarks/results/prediction.md): windows of about
    # 2^18 voxels (32x96x96 for a 16x48x48 patch) at overlap 0.25 scored 0.13-0.15 mean Dice above the
    # old default (the training patch, overlap 0.5, 8 mirrorings) at a fourteenth of its cost; overlap
    # 0.125 was 2.2x faster still but lost 0.02 on the three-class task, and 2^20-voxel windows lost 0.01.
    overlap: float = 0.25
    batch_size: int = 2  # windows per forward pass
    # average the 8 mirrorings of each window (nnU-Net does): 8x the compute of one pass
    mirror_tta: bool = False
    gaussian_sigma: float = 0.125  # of the window size, as in nnU-Net
    # "auto": the training patch grown to about window_voxels, then fitted to the volume's shape so that the
    # windows cover it with the fewest computed voxels (engine/tiling.py, fit_window); "patch": the training
    # patch; or (z, y, x), used as given
    window: Any = "auto"
    window_voxels: int = 2**18
    # largest output tile computed at once (memory: about 4 * (classes + 2) bytes a voxel)
    tile_voxels: int = 2**23

    def __post_init__(self) -> None:
        _check_positive("predict.overlap", self.overlap, allow_zero=True)
        if self.overlap >= 1:
            raise ValueError(f"config.predict.overlap must be in [0, 1), got {self.overlap!r}")
        _check_positive("predict.batch_size", self.batch_size, integer=True)
        _check_flags("predict", self)
        _check_positive("predict.gaussian_sigma", self.gaussian_sigma)
        if not (isinstance(self.window, str) and self.window in ("auto", "patch")):
            if isinstance(self.window, str):
                raise ValueError(f"config.predict.window must be 'auto', 'patch' or (z, y, x), got {self.window!r}")
            object.__setattr__(self, "window", _triple("predict.window", self.window))
        _check_positive("predict.window_voxels", self.window_voxels, integer=True)
        _check_positive("predict.tile_voxels", self.tile_voxels, integer=True)


@dataclass(frozen=True)
class Config:
    """The whole engine configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def __post_init__(self) -> None:
        for name, kind in (("model", ModelConfig), ("train", TrainConfig), ("predict", PredictConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"config.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build from a nested mapping; unknown keys are an error (typos must not pass silently)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"config must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"model", "train", "predict"}
        if unknown:
            raise ValueError(f"config has unknown sections {sorted(unknown)}; expected model, train, predict")
        parts = {}
        for name, kind in (("model", ModelConfig), ("train", TrainConfig), ("predict", PredictConfig)):
            if data.get(name) is not None and not isinstance(data[name], Mapping):
                raise TypeError(f"config.{name} must be a mapping of fields, got {data[name]!r}")
            section = dict(data.get(name) or {})
            known = {f.name for f in dataclasses.fields(kind)}
            bad = set(section) - known
            if bad:
                raise ValueError(f"config.{name} has unknown keys {sorted(bad)}; known keys: {sorted(known)}")
            parts[name] = kind(**section)
        return cls(**parts)

    @classmethod
    def from_preset(cls, name: str = "default", **overrides: Mapping[str, Any]) -> Config:
        """Build a named preset, with some fields changed.

        Parameters
        ----------
        name : {"default", "fast", "large"}
            See :data:`PRESETS`.
        **overrides : dict
            Per section, the fields to change: ``Config.from_preset("fast", train={"batch_size": 1})``.

        Returns
        -------
        Config
        """
        if name not in PRESETS:
            raise ValueError(f"config: preset must be one of {sorted(PRESETS)}, got {name!r}")
        data = {k: dict(v) for k, v in PRESETS[name].items()}
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        return cls.from_dict(data)

    def replace(self, **sections: Mapping[str, Any]) -> Config:
        """A copy with some fields changed, checked like a new configuration.

        Parameters
        ----------
        **sections : dict
            Per section, the fields to change: ``cfg.replace(train={"batch_size": 1})``.

        Returns
        -------
        Config
        """
        data = self.to_dict()
        for section, values in sections.items():
            if section not in data:
                raise ValueError(f"config has no section {section!r}")
            data[section].update(values)
        return Config.from_dict(data)

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The configuration as nested plain dicts and lists (what :meth:`from_dict` takes)."""

        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return {
            name: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()}
            for name in ("model", "train", "predict")
        }

    def to_json(self) -> str:
        """The configuration as a JSON string (kept in checkpoints and project manifests)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Parse what :meth:`to_json` wrote; unknown keys and bad values raise ``ValueError``."""
        return cls.from_dict(json.loads(text))


#: Starting points.  The defaults ("default") are tuned for a CPU, where the
#: number of optimisation steps within a budget matters most: a narrow network
#: on small patches (benchmarks/label_efficiency.py).  "large" is sized like
#: nnU-Net's full-resolution 3D U-Net for a GPU, where width and context are
#: cheap; ``run(config=None)`` picks it on CUDA.  "fast" trades accuracy for
#: the quickest steps (previews, smoke tests).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {"model": {"levels": 3, "deep_supervision": False}, "predict": {"mirror_tta": False}},
    "default": {},
    "large": {
        "model": {"base_features": 32, "levels": 5, "max_features": 320},
        "train": {"patch_voxels": 128**3, "batch_size": 2, "learning_rate": 1e-3, "prefetch": True},
        "predict": {"mirror_tta": True},
    },
}


def default_preset(device_type: str) -> str:
    """The preset ``config=None`` means on a device type ("cpu", "cuda", "mps")."""
    return "large" if device_type == "cuda" else "default"


def resolve_config(config: Config | str | Mapping[str, Any] | None, device_type: str = "cpu") -> Config:
    """The configuration a user's ``config=`` argument means.

    Parameters
    ----------
    config : Config, str, dict or None
        A configuration, a preset name, a nested dict, or ``None`` (the device's preset).
    device_type : str
        "cpu", "cuda" or "mps": which preset ``None`` means (see :func:`default_preset`).

    Returns
    -------
    Config
    """
    if config is None:
        return Config.from_preset(default_preset(device_type))
    if isinstance(config, Config):
        return config
    if isinstance(config, str):
        return Config.from_preset(config)
    if isinstance(config, Mapping):
        return Config.from_dict(config)
    raise TypeError(f"config must be None, a preset name, a dict or a Config, got {type(config).__name__}")
