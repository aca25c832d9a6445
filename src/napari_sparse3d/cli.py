"""The console command ``napari-sparse3d``: train, predict and run without a GUI.

Examples::

    napari-sparse3d run --sample cells --seconds 60 --output-dir demo
    napari-sparse3d train image.tif labels.tif --slices z=10,30 --slices y=64 --seconds 300 --output model.pt
    napari-sparse3d predict model.pt a.tif b.zarr c.npy --output-dir predictions --format zarr
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_sparse3d.config import PRESETS

__all__ = ["build_parser", "main", "parse_slices"]

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


def _config(args: argparse.Namespace) -> Any:
    if args.config:
        return json.loads(Path(args.config).read_text())
    return args.preset


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sparse3d",
        description="Train a 3D U-Net from a few annotated slices and segment volumes densely. Label files follow "
        "napari: 0 = not annotated, >= 1 = class. Images and labels may be .tif, .npy or .zarr.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from sparse labels and save a checkpoint")
    train.add_argument("image", help="the image volume (.tif/.npy/.zarr), or a project folder (resumes it)")
    train.add_argument("labels", nargs="?", help="sparse labels of the same shape (a project has its own)")
    train.add_argument("--output", "-o", help="checkpoint file to write (.pt); required unless IMAGE is a project")
    _add_training_options(train)
    _add_common(train)

    pred = sub.add_parser("predict", help="segment one or more volumes with a trained model")
    pred.add_argument("model", help="checkpoint written by train or run")
    pred.add_argument("images", nargs="+", help="volumes to segment")
    pred.add_argument("--output-dir", "-o", required=True, help="folder for <name>_labels.<format>")
    pred.add_argument(
        "--format", choices=["tif", "npy", "zarr"], default="tif", help="output format (zarr is written block by block)"
    )
    _add_common(pred)

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
    return parser


class _Progress:
    """A tqdm bar over the training budget, then over the prediction windows."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.phase = ""

    def __call__(self, report: Any) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        from napari_sparse3d.engine.prediction import PredictReport

        if isinstance(report, PredictReport):
            if self.phase != "predict":
                self._close()
                self.phase = "predict"
                self.bar = tqdm(total=report.windows_total, desc="predict", unit="window", file=sys.stderr)
            self.bar.update(report.windows_done - self.bar.n)  # redraws at most every mininterval
            return
        if self.phase != "train":
            self._close()
            self.phase = "train"
            self.bar = tqdm(
                total=100, desc="train", file=sys.stderr, mininterval=0.5, bar_format="{l_bar}{bar}| {elapsed}{postfix}"
            )
        skipped = f", {report.skipped} skipped" if report.skipped else ""
        self.bar.set_postfix_str(f"step {report.iteration}, loss {report.loss:.4f}{skipped}", refresh=False)
        self.bar.update(round(100 * report.progress) - self.bar.n)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close()


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        annotated_slices=parse_slices(args.slices),
        spacing=args.spacing,
        max_seconds=args.seconds,
        max_iterations=args.iterations,
        device=args.device,
        seed=args.seed,
        config=_config(args),
        channel_axis=args.channel_axis,
        background_label=args.background_label,
        init=args.init,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from napari_sparse3d.api import run
    from napari_sparse3d.io.project import Project, is_project

    project = is_project(args.image)
    if not project and (args.labels is None or args.output is None):
        raise ValueError("train needs IMAGE LABELS --output MODEL.pt, or a project folder as IMAGE")
    if args.output:
        _check_target(Path(args.output), args.overwrite, [args.image, args.labels, args.init])
    progress = _Progress(args.quiet)
    res = run(args.image, args.labels, progress=progress, **_train_kwargs(args))
    progress.close()
    if args.output:
        print(f"checkpoint written to {res.save(args.output)}")
    if project:
        print(f"project {args.image}: latest checkpoint {Project.open(args.image).checkpoint('latest')}")
    print(f"trained {len(res.history)} steps")
    return 0


def _cmd_project(args: argparse.Namespace) -> int:
    from napari_sparse3d.io.arrays import load_array
    from napari_sparse3d.io.project import Project

    if args.image is None:
        project = Project.open(args.path)
        labels, slices = project.annotations()
        info = {
            "path": str(project.path),
            "shape": list(project.shape),
            "spacing": project.spacing,
            "image": project.manifest["image"],
            "annotated_slices": {str(a): v for a, v in slices.items()},
            "annotated_voxels": int((labels > 0).sum()),
            "iterations": project.history[-1]["iteration"] if project.history else 0,
            "latest_checkpoint": str(project.checkpoint("latest")) if project.checkpoint("latest") else None,
            "prediction": project.prediction() is not None,
            "versions": project.manifest.get("versions"),
        }
        print(json.dumps(info, indent=2))
        return 0
    image = load_array(args.image)
    labels = None if args.labels is None else load_array(args.labels, name="labels")
    project = Project.create(
        args.path,
        image,
        labels=labels,
        annotated_slices=parse_slices(args.slices) or {},
        spacing=args.spacing,
        image_path=args.image if args.reference else None,
        overwrite=args.overwrite,
    )
    project.close()
    print(f"project created at {project.path}")
    return 0


def output_stems(images: Sequence[str]) -> list[str]:
    """Distinct output names for several inputs: ``a.tif`` -> ``a``; ``a.tif`` and ``a.zarr`` -> ``a_tif``, ``a_zarr``."""
    stems = [Path(i).name.split(".")[0] for i in images]
    clash = {s for s in stems if stems.count(s) > 1}
    stems = [Path(i).name.replace(".", "_") if s in clash else s for i, s in zip(images, stems)]
    taken: set[str] = set()
    out = []
    for stem in stems:
        name, n = stem, 1
        while name in taken or (name != stem and name in stems):
            n += 1
            name = f"{stem}_{n}"
        taken.add(name)
        out.append(name)
    return out


def _check_target(target: Path, overwrite: bool, inputs: Sequence[Any]) -> None:
    from napari_sparse3d.io.files import check_output_path

    check_output_path(target, name="output", overwrite=overwrite, inputs=inputs,
                      what=f"{target.suffix.lower()} output of napari-sparse3d")


def _cmd_predict(args: argparse.Namespace) -> int:
    from napari_sparse3d.api import predict
    from napari_sparse3d.io.arrays import save_array
    from napari_sparse3d.io.checkpoint import load_checkpoint

    model = load_checkpoint(args.model)
    out_dir = Path(args.output_dir)
    targets = [out_dir / f"{stem}_labels.{args.format}" for stem in output_stems(args.images)]
    inputs = [args.model, *args.images]
    for target in targets:  # refuse before hours of work, not after
        _check_target(target, args.overwrite, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image, target in zip(args.images, targets):
        progress = _Progress(args.quiet)
        if args.format == "zarr":
            predict(image, model, out=str(target), overwrite=args.overwrite, device=args.device, progress=progress,
                    channel_axis=args.channel_axis)
        else:
            labels = predict(image, model, device=args.device, progress=progress, channel_axis=args.channel_axis)
            save_array(target, labels, overwrite=args.overwrite, inputs=inputs)
        progress.close()
        print(f"{image} -> {target}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_sparse3d.api import run
    from napari_sparse3d.evaluation.metrics import annotated_slice_mask, dice_per_class
    from napari_sparse3d.evaluation.render import save_orthogonal_views
    from napari_sparse3d.io.arrays import load_array, save_array
    from napari_sparse3d.io.project import Project, is_project

    kwargs = _train_kwargs(args)
    truth = None
    run_target: Any = None
    if args.sample:
        if args.image or args.labels:
            raise SystemExit("napari-sparse3d run: give either IMAGE LABELS or --sample, not both")
        from napari_sparse3d.sample_data import evenly_spaced_slices, make_cells, sparse_annotations

        image, truth = make_cells(classes=3 if args.sample == "cells3" else 2)
        kwargs["annotated_slices"] = evenly_spaced_slices(image.shape, args.sample_slices)
        labels = sparse_annotations(truth, kwargs["annotated_slices"])
    elif is_project(args.image):
        labels = None if args.labels is None else load_array(args.labels, name="labels")
        with Project.open(args.image) as project:  # what run() will train on, for the summary's views
            saved = project.training_inputs(labels=labels, annotated_slices=kwargs["annotated_slices"])
        image, kwargs["annotated_slices"] = saved.image, saved.annotated_slices
        run_target = args.image
    else:
        if not (args.image and args.labels):
            raise SystemExit("napari-sparse3d run: IMAGE and LABELS are required (or use --sample, or a project)")
        image, labels = load_array(args.image), load_array(args.labels, name="labels")
    out_dir = Path(args.output_dir)
    names = ["labels.tif", "model.pt", "views.png", "summary.json"] + (["image.tif", "annotations.tif"] if args.sample else [])
    inputs = [args.image, args.labels, args.init]
    for name in names:  # refuse before training, not after
        _check_target(out_dir / name, args.overwrite, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = _Progress(args.quiet)
    res = run(run_target if run_target is not None else image, labels, progress=progress, **kwargs)
    progress.close()
    save_array(out_dir / "labels.tif", res.labels, overwrite=args.overwrite, inputs=inputs)
    res.save(out_dir / "model.pt")
    if args.sample:
        save_array(out_dir / "image.tif", image, overwrite=args.overwrite)
        save_array(out_dir / "annotations.tif", labels, overwrite=args.overwrite)
    view_image = image if args.channel_axis is None else np.take(np.asarray(image), 0, axis=args.channel_axis)
    save_orthogonal_views(out_dir / "views.png", view_image, res.labels, annotated_slices=kwargs["annotated_slices"],
                          spacing=args.spacing)
    summary: dict[str, Any] = {
        "iterations": len(res.history),
        "final_loss": res.history[-1].loss,
        "train_seconds": res.history[-1].elapsed,
        "patch_size": list(res.patch_size),
        "class_values": res.class_values,
    }
    if truth is not None:
        mask = ~annotated_slice_mask(truth.shape, kwargs["annotated_slices"])
        summary["dice_outside_annotated_slices"] = {
            str(k): round(v, 4) for k, v in dice_per_class(res.labels, truth, mask=mask).items()
        }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out_dir / 'labels.tif'}, {out_dir / 'model.pt'}, {out_dir / 'views.png'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_slices(getattr(args, "slices", None))  # report format errors before loading anything
        handler = {"train": _cmd_train, "predict": _cmd_predict, "run": _cmd_run, "project": _cmd_project}[args.command]
        return handler(args)
    except (argparse.ArgumentTypeError, ValueError, TypeError, OSError) as exc:
        parser.exit(2, f"napari-sparse3d {args.command}: error: {exc}\n")
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
