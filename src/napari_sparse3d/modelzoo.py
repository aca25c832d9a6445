"""Export a trained model as a bioimage.io model package (model spec 0.5), for the BioImage Model Zoo's tools.

``export(model, "model.zip")`` (or ``napari-sparse3d export model.pt model.zip``)
writes a zip that bioimage.io's tools (bioimageio.core, deepImageJ, ilastik,
...) can run:

- **weights**: ``pytorch_state_dict`` with the architecture from this package's
  own source (:class:`napari_sparse3d.engine.exported.ExportedUNet`, imported
  from the installed napari-sparse3d) and TorchScript (traced from it, needing
  nothing but torch);
- **input** ``raw`` (batch, channel, z, y, x) of any size ``min + n * step``
  per axis (the network's stride), **output** ``probabilities`` of the same size
  with a **halo** per axis that a tiling consumer discards (the pixel
  classifier's filter margin, at least one stride);
- **preprocessing** the model's normalisation: clipping to the 0.5/99.5
  percentiles and z-score of each image ("image" mode; bioimage.io takes the
  z-score's mean and std from the image before clipping, napari-sparse3d from
  the clipped image, which differs only for images with extreme outliers), or
  clipping to the training bounds and the training statistics ("dataset" mode);
- **test tensors** (a crop of ``image`` when given, else intensities drawn from
  the training statistics) with the output this package computes for them; a
  **cover** from the orthogonal-view renderer; **documentation** with the
  classes, the voxel size, the training history and the last validation Dice.

Needs the ``bioimageio`` extra (``bioimageio.spec``; ``bioimageio.core`` to test
a package: ``bioimageio test model.zip``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_sparse3d.engine.annotations import class_value_array
from napari_sparse3d.engine.preprocess import round_up
from napari_sparse3d.engine.trained import model_info
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.io.checkpoint import as_model
from napari_sparse3d.io.files import check_output_path, write_aside

__all__ = ["export"]

CITATION = ("Çiçek et al. (2016), 3D U-Net: learning dense volumetric segmentation from sparse annotation, MICCAI",
            "10.1007/978-3-319-46723-8_49")
_AXES = ("z", "y", "x")


def _spec() -> Any:
    try:
        import bioimageio.spec.model.v0_5 as spec
    except ImportError:
        raise ModuleNotFoundError(
            "export needs bioimageio.spec: pip install 'napari-sparse3d[bioimageio]'"
        ) from None
    return spec


def _geometry(net: Any, patch: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Per axis: halo, smallest valid size, step, and the test tensor's size."""
    step = [int(d) for d in net.divisor]
    head_halo = net.pixel_head.halo if net.pixel_head is not None else (0, 0, 0)
    halo = [max(int(h), s) for h, s in zip(head_halo, step)]
    minimum = [round_up(2 * h + s, s) for h, s in zip(halo, step)]
    size = [max(m, round_up(p, s)) for m, p, s in zip(minimum, patch, step)]
    return halo, minimum, step, size


def _test_input(image: Any, info: Any, size: Sequence[int], seed: int, channel_axis: int | None = None) -> np.ndarray:
    """``(1, C, z, y, x)`` float32: the centre crop of ``image`` (padded by reflection where smaller), or noise."""
    if image is not None:
        volume = as_volume(image, channel_axis)
        if volume.channels != info.in_channels:
            raise ValueError(f"image has {volume.channels} channels, but the model was trained on {info.in_channels}")
        shape = volume.spatial_shape
        start = [max(0, (n - s) // 2) for n, s in zip(shape, size)]
        crop = np.asarray(volume.read(tuple(slice(a, a + s) for a, s in zip(start, size))), dtype=np.float32)
        if not np.isfinite(crop).all():  # the package's test tensors would hold NaN: its own test fails
            raise ValueError(f"image: the test crop {tuple(crop.shape[1:])} at {tuple(start)} holds NaN or infinite"
                             " values; give an image without them (e.g. numpy.nan_to_num)")
        pad = [(0, 0)] + [(0, s - c) for s, c in zip(size, crop.shape[1:])]
        return np.pad(crop, pad, mode="reflect" if min(crop.shape[1:]) > 1 else "edge")[None]
    norm = info.normalization
    rng = np.random.default_rng(seed)
    channels = [rng.normal(m, s, size).clip(lo, hi) for m, s, lo, hi in zip(norm.mean, norm.std, norm.lower, norm.upper)]
    return np.stack(channels)[None].astype(np.float32)


def _preprocess(x: np.ndarray, norm: Any) -> tuple[np.ndarray, list[Any]]:
    """What the package's preprocessing does to ``x``, and its descriptors."""
    spec = _spec()
    spatial = [spec.AxisId(a) for a in _AXES]
    out = np.empty_like(x)
    if norm.mode == "image":
        # bioimage.io computes a sample's statistics once, on the image as it comes: the z-score uses the
        # mean and std of the unclipped image (napari-sparse3d's, of the clipped one: close unless the
        # image has extreme outliers)
        for b in range(x.shape[0]):
            for c in range(x.shape[1]):
                lo, hi = np.percentile(x[b, c], [0.5, 99.5])
                out[b, c] = (np.clip(x[b, c], lo, hi) - x[b, c].mean()) / (x[b, c].std() + 1e-6)
        steps = [
            spec.ClipDescr(kwargs=spec.ClipKwargs(min_percentile=0.5, max_percentile=99.5, axes=spatial)),
            spec.ZeroMeanUnitVarianceDescr(kwargs=spec.ZeroMeanUnitVarianceKwargs(axes=spatial)),
        ]
        return out, steps
    if len(set(norm.lower)) > 1 or len(set(norm.upper)) > 1:
        raise ValueError("model: a multichannel model with 'dataset' normalisation clips each channel to its own bounds,"
                         " which a bioimage.io package cannot express; train with normalization 'image' to export it")
    for c, (m, s) in enumerate(zip(norm.mean, norm.std)):
        out[:, c] = (np.clip(x[:, c], norm.lower[0], norm.upper[0]) - m) / (s + 1e-6)
    zscore = (spec.FixedZeroMeanUnitVarianceKwargs(mean=float(norm.mean[0]), std=float(norm.std[0]))
              if len(norm.mean) == 1 else spec.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                  mean=[float(v) for v in norm.mean], std=[float(v) for v in norm.std], axis=spec.AxisId("channel")))
    steps = [spec.ClipDescr(kwargs=spec.ClipKwargs(min=float(norm.lower[0]), max=float(norm.upper[0]))),
             spec.FixedZeroMeanUnitVarianceDescr(kwargs=zscore)]
    return out, steps


def _documentation(info: Any, name: str, classes: Sequence[str]) -> str:
    history = info.history
    vals = [h["val_dice"] for h in history if h.get("val_dice") is not None]
    lines = [
        f"# {name}", "",
        "A 3D U-Net trained with napari-sparse3d from a few annotated slices: unlabeled voxels weigh zero in the loss"
        " (Çiçek et al. 2016); a pixel classifier on multiscale filters gives the network its prior." if
        info.config.model.pixel_classifier else
        "A 3D U-Net trained with napari-sparse3d from a few annotated slices: unlabeled voxels weigh zero in the loss"
        " (Çiçek et al. 2016).", "",
        "## Inputs and outputs", "",
        f"- input `raw`: {info.in_channels} channel(s), axes (batch, channel, z, y, x), voxel size (z, y, x) "
        f"{tuple(info.spacing) if info.spacing else 'not given (isotropic assumed)'} as in training",
        f"- output `probabilities`: one channel per class ({', '.join(classes)}); the label of a voxel is the argmax",
        f"- normalisation: {info.normalization.mode} mode (clip to 0.5/99.5 percentiles, z-score)", "",
        "## Training", "",
        f"- steps: {int(history[-1]['iteration']) if history else 0}; last training loss"
        f" {float(history[-1]['loss']):.4f}" if history else "- steps: 0",
        f"- validation Dice on held-out annotated voxels: {vals[-1]:.3f} (last), {max(vals):.3f} (best)" if vals else
        "- validation Dice: not measured (nothing was held out)",
        f"- training patch (z, y, x): {tuple(info.patch_size)}", "",
        "## Validation", "",
        "The Dice above is measured on annotated voxels the network did not train on. Check the result on your own"
        " data: a model trained on one volume is only as general as the volumes it saw.", "",
    ]
    return "\n".join(lines)


def export(
    model_or_checkpoint: Any,
    path: str | os.PathLike,
    *,
    image: Any = None,
    channel_axis: int | None = None,
    name: str | None = None,
    description: str | None = None,
    authors: Sequence[str] = ("napari-sparse3d user",),
    license: str = "CC-BY-4.0",
    overwrite: bool = False,
) -> Path:
    """Write ``model_or_checkpoint`` as a bioimage.io model package (a zip) at ``path`` (see the module docstring).

    ``image`` (an array or a path) provides the test tensors and the cover; by
    default they are drawn from the training statistics (``channel_axis``: that of a 4D ``image``).  ``license`` is an SPDX
    identifier.  Returns the path written.
    """
    from napari_sparse3d.engine.exported import ExportedUNet, torch_version, write_weights
    from napari_sparse3d.evaluation.render import save_orthogonal_views
    from napari_sparse3d.io.arrays import open_input

    spec = _spec()
    from bioimageio.spec import save_bioimageio_package

    target = check_output_path(path, name="path", overwrite=overwrite, inputs=[model_or_checkpoint, image],
                               what="model package")
    if target.suffix.lower() != ".zip":
        raise ValueError(f"path must end in .zip (a bioimage.io model package), got {str(target)!r}")
    net = as_model(model_or_checkpoint, name="model_or_checkpoint")
    info = model_info(net)
    image = open_input(image, name="image") if image is not None else None
    classes = [f"class_{v}" for v in info.class_values]
    kwargs = json.loads(json.dumps({
        "in_channels": info.in_channels, "num_classes": len(info.class_values),
        "model": info.config.to_dict()["model"], "spacing": None if info.spacing is None else list(info.spacing),
    }))
    wrapper = ExportedUNet.wrapping(net.cpu(), kwargs)
    halo, minimum, step, size = _geometry(wrapper.net, info.patch_size)
    raw = _test_input(image, info, size, seed=0, channel_axis=channel_axis)
    normalised, preprocessing = _preprocess(raw, info.normalization)
    name = name or f"napari-sparse3d 3D U-Net ({len(classes)} classes)"
    with tempfile.TemporaryDirectory() as folder:
        d = Path(folder)
        probabilities = write_weights(wrapper, normalised, d)
        np.save(d / "test_input.npy", raw)
        np.save(d / "test_output.npy", probabilities)
        save_orthogonal_views(d / "cover.png", raw[0, 0], class_value_array(info.class_values)[probabilities[0].argmax(0)])
        (d / "README.md").write_text(_documentation(info, name, classes), encoding="utf-8")
        input_id = spec.TensorId("raw")
        inputs = spec.InputTensorDescr(
            id=input_id,
            axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(f"channel{c}") for c in
                                                                    range(info.in_channels)]),
                  *[spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=m, step=s))
                    for a, m, s in zip(_AXES, minimum, step)]],
            test_tensor=spec.FileDescr(source=d / "test_input.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=preprocessing,
        )
        outputs = spec.OutputTensorDescr(
            id=spec.TensorId("probabilities"),
            axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in classes]),
                  *[spec.SpaceOutputAxisWithHalo(id=spec.AxisId(a), halo=h,
                                                 size=spec.SizeReference(tensor_id=input_id, axis_id=spec.AxisId(a)))
                    for a, h in zip(_AXES, halo)]],
            test_tensor=spec.FileDescr(source=d / "test_output.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        )
        version = spec.Version(torch_version())
        weights = spec.WeightsDescr(
            pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                source=d / "weights.pt", pytorch_version=version,
                architecture=spec.ArchitectureFromLibraryDescr(
                    import_from="napari_sparse3d.engine.exported", callable=spec.Identifier("ExportedUNet"), kwargs=kwargs),
            ),
            torchscript=spec.TorchscriptWeightsDescr(source=d / "weights_torchscript.pt", pytorch_version=version,
                                                     parent="pytorch_state_dict"),
        )
        descr = spec.ModelDescr(
            name=name,
            description=description or "3D U-Net trained with napari-sparse3d from sparsely annotated slices",
            authors=[spec.Author(name=a) for a in authors],
            cite=[spec.CiteEntry(text=CITATION[0], doi=spec.Doi(CITATION[1]))],
            license=spec.LicenseId(license),
            documentation=spec.FileDescr(source=d / "README.md"),
            covers=[spec.FileDescr(source=d / "cover.png")],
            tags=["3d", "unet", "semantic-segmentation", "napari-sparse3d", "sparse-annotation"],
            inputs=[inputs],
            outputs=[outputs],
            weights=weights,
        )
        with write_aside(target) as tmp:
            save_bioimageio_package(descr, output_path=tmp.with_suffix(".zip"))
            tmp.with_suffix(".zip").replace(tmp)
    return target
