"""The console command's arguments: the parser, and the parsing of slices and training inputs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from napari_sparse3d.config import PRESETS

__all__ = ["AXES", "build_parser", "parse_slices", "training_pairs", "volume_slices"]

AXES = {"z": 0, "y": 1, "x": 2, "0": 0, "1": 1, "2": 2}


def parse_slices(items: Sequence[str] | None) -> dict[int, list[int]] | None:
    """``["z=10,30", "x=5"]`` -> ``{0: [10, 30], 2: [5]}``."""
    if not items:
        return None
    out: dict[int, list[int]] = {}
    for item in items:
        axis, sep, indices = item.partition("=")
        if not sep or axis.strip().lower() not in AXES:
            raise argparse.ArgumentTypeError(f"--slices expects AXIS=I,J,... with AXIS one of z, y, x (or 0, 1, 2), got {item!r}")
        try:
            values = [int(v) for v in indices.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--slices: indices must be integers, got {item!r}") from None
        out.setdefault(AXES[axis.strip().lower()], []).extend(values)
    return out


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slices",
        action="append",
        metavar="AXIS=I,J",
        help="fully annotated slices, e.g. --slices z=10,30 --slices x=64: inside them unpainted voxels are "
        "background (repeat per axis)",
    )
    p.add_argument("--background-label", type=int, help="a label value that means background everywhere (scribbles)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="voxel size; default isotropic")
    p.add_argument("--seconds", type=float, help="training budget in seconds (default 120 if no --iterations)")
    p.add_argument("--iterations", type=int, help="training budget in optimisation steps")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="configuration preset (default: 'large' on CUDA, 'default' elsewhere); --config overrides it",
    )
    p.add_argument("--config", help="JSON file with a configuration {model: {...}, train: {...}, predict: {...}}")
    p.add_argument("--init", help="checkpoint to continue training from (warm start)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs of this command (never other files)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--channel-axis", type=int, help="the channel axis of a 4D (multichannel) image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_postprocess_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-size", type=int, default=0, metavar="N", help="remove connected pieces of a class smaller than "
                   "N voxels (they take the class of the nearest voxel kept); with --instances also instances under N voxels")
    p.add_argument("--keep-largest", action="store_true", help="keep only the largest connected piece of each class")
    p.add_argument("--instances", metavar="OUT", help="also write instance labels (uint32, one id per object, 0 "
                   "background; .tif/.npy/.zarr) by a seeded watershed of the labels; one image only")
    p.add_argument("--interior", type=int, default=1, help="with --instances: the class of object interiors (default 1)")
    p.add_argument("--boundary", default="auto", help="with --instances: the class of object boundaries, or 'none' "
                   "(objects are then split at distance-transform peaks); default 2 if the model predicts class 2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sparse3d",
        description="Train a 3D U-Net from a few annotated slices and segment volumes densely. Label files follow "
        "napari: 0 = not annotated, >= 1 = class. Images and labels may be .tif, .npy or .zarr.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from sparse labels and save a checkpoint")
    train.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE LABELS | PROJECT",
        help="an image volume (.tif/.npy/.zarr) and its sparse labels, or a project folder (resumes it); several "
        "pairs and projects train one model on all of them (--slices N:z=10 names the N-th volume's slices)",
    )
    train.add_argument("--output", "-o", help="checkpoint file to write (.pt); required unless IMAGE is a project")
    _add_training_options(train)
    _add_common(train)

    pred = sub.add_parser("predict", help="segment one or more volumes with a trained model")
    pred.add_argument("model", help="checkpoint written by train or run")
    pred.add_argument("images", nargs="+", help="volumes to segment")
    pred.add_argument("--output-dir", "-o", required=True, help="folder for <name>_labels.<format>")
    pred.add_argument(
        "--format", choices=["tif", "npy", "zarr"], default="tif",
        help="output format (zarr: an OME-Zarr label image with the spacing as its scale, written block by block)",
    )
    pred.add_argument("--pyramid", type=int, default=0, metavar="N",
                      help="with --format zarr: N coarser levels (2x per level; nearest) for viewers")
    cluster = pred.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="predict on a local dask cluster of N worker processes (one thread each); needs --format zarr"
                         " and the 'cluster' extra; an interrupted run started again resumes")
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="predict on an existing dask.distributed cluster (e.g. tcp://host:8786, started by"
                         " dask-jobqueue on SLURM/LSF); input and output paths must be reachable from its workers")
    pred.add_argument(
        "--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
        help="voxel size of the images; where it differs from the model's training spacing by more than 5%%, the "
        "images are resampled to it for prediction and the labels come back on the images' own grid",
    )
    _add_common(pred)
    _add_postprocess_options(pred)

    run = sub.add_parser(
        "run",
        help="train on sparse labels and segment the same volume; writes labels, checkpoint and a PNG of orthogonal views",
    )
    run.add_argument("image", nargs="?", help="the image volume, or a project folder (omit with --sample)")
    run.add_argument("labels", nargs="?", help="sparse labels (omit with --sample or a project)")
    run.add_argument("--sample", choices=["cells", "cells3"], help="use generated sample data instead of files "
                     "(cells: 2 classes; cells3: background, interior, boundary) with --sample-slices annotated slices per axis")
    run.add_argument("--sample-slices", type=int, default=2, help="annotated slices per axis for --sample (default 2)")
    run.add_argument("--output-dir", "-o", required=True, help="folder for labels.tif, model.pt, views.png, summary.json")
    _add_training_options(run)
    _add_common(run)

    proj = sub.add_parser(
        "project",
        help="make a project folder (image, annotations, models, history in one zarr directory) or describe one",
    )
    proj.add_argument("path", help="the project folder (e.g. cells.zarr)")
    proj.add_argument("image", nargs="?", help="image to start a new project with (omit to describe an existing one)")
    proj.add_argument("labels", nargs="?", help="sparse labels to start with")
    proj.add_argument("--slices", action="append", metavar="AXIS=I,J", help="fully annotated slices, e.g. z=10,20 (repeatable)")
    proj.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="voxel size; default isotropic")
    proj.add_argument("--reference", action="store_true", help="keep the image file where it is (stored: its path and "
                      "content hash) instead of copying it into the project")
    proj.add_argument("--overwrite", action="store_true", help="replace an earlier project at PATH (never another folder)")

    exp = sub.add_parser("export", help="write a trained model as a bioimage.io model package (a .zip; needs the"
                         " 'bioimageio' extra)")
    exp.add_argument("model", help="checkpoint written by train or run")
    exp.add_argument("package", help="the package to write (.zip)")
    exp.add_argument("--image", help="a volume to cut the test tensors and the cover from (default: drawn from the"
                     " training statistics)")
    exp.add_argument("--channel-axis", type=int, help="the channel axis of a 4D (multichannel) --image")
    exp.add_argument("--name", help="the model's name in the package")
    exp.add_argument("--author", action="append", help="an author's name (repeatable)")
    exp.add_argument("--license", default="CC-BY-4.0", help="SPDX licence identifier of the weights (default CC-BY-4.0)")
    exp.add_argument("--overwrite", action="store_true", help="replace an earlier package at PACKAGE")
    return parser


def training_pairs(inputs: Sequence[str], is_project: Any) -> list[tuple[str, str | None]]:
    """``IMAGE LABELS PROJECT IMAGE LABELS ...`` -> ``[(image, labels), (project, None), ...]``."""
    pairs: list[tuple[str, str | None]] = []
    items = list(inputs)
    while items:
        first = items.pop(0)
        if is_project(first):
            pairs.append((first, None))
        elif not items:
            raise ValueError(
                f"train needs IMAGE LABELS --output MODEL.pt, or a project folder as IMAGE: the image {first!r} has no"
                " LABELS after it"
            )
        else:
            pairs.append((first, items.pop(0)))
    return pairs


def volume_slices(items: Sequence[str] | None, count: int) -> list[dict[int, list[int]] | None]:
    """``--slices`` for ``count`` volumes: ``N:z=10`` names volume N (1-based); without ``N:`` all volumes."""
    shared: list[str] = []
    own: dict[int, list[str]] = {}
    for item in items or []:
        head, sep, rest = item.partition(":")
        if sep and head.strip().isdigit():
            index = int(head)
            if not 1 <= index <= count:
                raise argparse.ArgumentTypeError(f"--slices {item!r}: volume {index} does not exist (1..{count})")
            own.setdefault(index - 1, []).append(rest)
        else:
            shared.append(item)
    return [parse_slices(shared + own.get(i, [])) for i in range(count)]


