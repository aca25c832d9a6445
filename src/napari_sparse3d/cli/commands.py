"""The console command's sub-commands (train, predict, run, project) and its entry point :func:`main`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_sparse3d.cli.parser import build_parser, parse_slices, training_pairs, volume_slices
from napari_sparse3d.cli.progress import Interrupt, Progress

__all__ = ["main", "output_stems"]


def _config(args: argparse.Namespace) -> Any:
    if args.config:
        try:
            return json.loads(Path(args.config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--config: {args.config!r} is not a readable JSON file ({exc})") from None
    return args.preset


def _spacing_from_file(args: argparse.Namespace, path: Any) -> None:
    """Without ``--spacing``, the voxel size that the image file records (TIFF resolution, OME) is the spacing."""
    if getattr(args, "spacing", None) is not None or not path or not Path(str(path)).exists():
        return
    from napari_sparse3d.io.voxel_size import file_voxel_size

    found = file_voxel_size(path)
    if found is not None:
        args.spacing = list(found)
        print(f"voxel size from {Path(str(path)).name}: {' x '.join(f'{v:g}' for v in found)} (z x y x x)",
              file=sys.stderr)


def _train_kwargs(args: argparse.Namespace, *, slices: bool = True) -> dict[str, Any]:
    return dict(
        annotated_slices=parse_slices(args.slices) if slices else None,
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

    pairs = training_pairs(args.inputs, is_project)
    if args.output is None and not is_project(pairs[0][0]):
        raise ValueError(
            "train needs IMAGE LABELS --output MODEL.pt, or a project folder as IMAGE (--output is needed unless the"
            " first input is a project, which keeps the checkpoints)"
        )
    if args.output:
        _check_target(Path(args.output), args.overwrite, [*args.inputs, args.init])
    progress = Progress(args.quiet)
    if len(pairs) == 1 and not is_project(pairs[0][0]):
        _spacing_from_file(args, pairs[0][0])
    kwargs = _train_kwargs(args, slices=False)
    with Interrupt(progress) as interrupt:
        if len(pairs) == 1:
            kwargs["annotated_slices"] = volume_slices(args.slices, 1)[0]
            res = run(pairs[0][0], pairs[0][1], progress=progress, stop=interrupt.stop, **kwargs)
        else:
            kwargs["annotated_slices"] = volume_slices(args.slices, len(pairs))
            res = run([p[0] for p in pairs], [p[1] for p in pairs], progress=progress, stop=interrupt.stop,
                      **kwargs)[0]
    progress.close()
    if args.output:
        print(f"checkpoint written to {res.save(args.output)}")
    if is_project(pairs[0][0]):
        print(f"project {pairs[0][0]}: latest checkpoint {Project.open(pairs[0][0]).checkpoint('latest')}")
    early = " (stopped early by a signal)" if interrupt.stop.is_set() else ""
    print(f"trained {len(res.history)} steps on {len(pairs)} volume{'s' if len(pairs) > 1 else ''}{early}")
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
    _spacing_from_file(args, args.image)
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

    if target.suffix.lower() != ".zarr" and target.is_dir() and not target.is_symlink():
        raise ValueError(f"output: {str(target)!r} is a folder; give the path of the file to write"
                         f" (e.g. {str(target / ('model' + (target.suffix or '.pt')))!r})")
    check_output_path(target, name="output", overwrite=overwrite, inputs=inputs,
                      what=f"{target.suffix.lower()} output of napari-sparse3d")


def _check_postprocess(args: argparse.Namespace, classes: Sequence[int], targets: Sequence[Path], inputs: Any) -> Any:
    """Refuse bad post-processing options before any work; returns the boundary class value (None: none)."""
    if args.min_size < 0:
        raise ValueError(f"--min-size must be >= 0, got {args.min_size}")
    words = {"auto": 2 if 2 in classes and args.interior != 2 else None, "none": None}
    boundary = words.get(args.boundary.lower(), args.boundary)
    if boundary is not None and not str(boundary).isdigit():
        raise ValueError(f"--boundary must be a class value, 'none' or 'auto', got {args.boundary!r}")
    boundary = None if boundary is None else int(boundary)
    if args.instances:
        if len(args.images) != 1 or Path(args.instances).resolve() in {t.resolve() for t in targets}:
            raise ValueError("--instances OUT writes one array: give one image, and OUT apart from the labels' outputs")
        if not {args.interior, boundary} <= {*classes, None}:
            raise ValueError(f"--interior {args.interior} and --boundary {boundary} must be classes of the model: {classes}")
        _check_target(Path(args.instances), args.overwrite, inputs)
    return boundary


def _postprocess(args: argparse.Namespace, labels: Any, info: Any, boundary: int | None, inputs: Sequence[Any]) -> Any:
    """The labels cleaned as asked; writes the instances when asked."""
    import numpy as np

    from napari_sparse3d.engine.postprocess import clean_labels, instances_from_prediction
    from napari_sparse3d.io.arrays import save_array

    largest = [v for v in info.class_values if v != 0] if args.keep_largest else ()
    before = labels
    labels = clean_labels(labels, min_size=args.min_size, keep_largest=largest)
    if (labels == 0).all() and not (np.asarray(before) == 0).all():  # 0 need not even be a class of the model
        print(f"warning: --min-size {args.min_size} removed every object: the labels are all 0", file=sys.stderr)
    if args.instances:
        instances = instances_from_prediction(labels, interior=args.interior, boundary=boundary, min_size=args.min_size,
                                              spacing=getattr(args, "spacing", None) or info.spacing)
        save_array(args.instances, instances, overwrite=args.overwrite, inputs=inputs)
        print(f"{int(instances.max())} instances -> {args.instances}")
    return labels


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_sparse3d.api import predict
    from napari_sparse3d.io.arrays import save_array
    from napari_sparse3d.io.checkpoint import load_checkpoint
    from napari_sparse3d.io.outputs import save_labels

    if args.pyramid < 0 or (args.pyramid and args.format != "zarr"):
        raise ValueError(f"--pyramid must be >= 0 and needs --format zarr, got {args.pyramid} with --format {args.format}")
    model = load_checkpoint(args.model)
    out_dir = Path(args.output_dir)
    targets = [out_dir / f"{stem}_labels.{args.format}" for stem in output_stems(args.images)]
    inputs = [args.model, *args.images]
    for target in targets:  # refuse before hours of work, not after
        _check_target(target, args.overwrite, inputs)
    boundary = _check_postprocess(args, model.sparse3d.class_values, targets, inputs)
    post = bool(args.min_size or args.keep_largest or args.instances)  # needs the whole volume (not zarr block by block)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.workers is not None or args.scheduler is not None:
        return _predict_on_cluster(args, model, targets, post)
    for image, target in zip(args.images, targets):
        progress = Progress(args.quiet)
        if args.format == "zarr" and not post:
            predict(image, model, out=str(target), overwrite=args.overwrite, device=args.device, progress=progress,
                    channel_axis=args.channel_axis, spacing=args.spacing, pyramid=args.pyramid)
        else:
            labels = predict(image, model, device=args.device, progress=progress, channel_axis=args.channel_axis,
                             spacing=args.spacing)
            if post:
                labels = _postprocess(args, labels, model.sparse3d, boundary, inputs)
            if args.format == "zarr":  # an OME-Zarr label image, as predict writes it
                save_labels(target, np.asarray(labels), model.sparse3d.class_values, overwrite=args.overwrite,
                            inputs=inputs, spacing=args.spacing or model.sparse3d.spacing, pyramid=args.pyramid)
            else:
                save_array(target, labels, overwrite=args.overwrite, inputs=inputs)
        progress.close()
        print(f"{image} -> {target}")
    return 0


def _cluster_client(args: argparse.Namespace) -> Any:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--workers/--scheduler need dask.distributed: pip install 'napari-sparse3d[cluster]'") from None
    if args.scheduler is not None:
        return Client(args.scheduler)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster)


def _predict_on_cluster(args: argparse.Namespace, model: Any, targets: Sequence[Path], post: bool) -> int:
    from napari_sparse3d.distributed import predict_distributed

    if args.format != "zarr" or post:
        raise ValueError("--workers/--scheduler write OME-Zarr block by block: use --format zarr, without"
                         " --min-size/--keep-largest/--instances (post-process the result afterwards)")
    client = _cluster_client(args)
    try:
        for image, target in zip(args.images, targets):
            progress = Progress(args.quiet)
            result = predict_distributed(image, model, target, client=client, spacing=args.spacing,
                                         overwrite=args.overwrite, channel_axis=args.channel_axis, progress=progress,
                                         pyramid=args.pyramid)
            progress.close()
            resumed = f" ({result.skipped} tiles finished by an earlier run)" if result.skipped else ""
            print(f"{image} -> {target}: {result.computed} of {result.tiles} tiles on"
                  f" {len(client.scheduler_info().get('workers', {}))} workers in {result.seconds:.0f} s{resumed}")
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and args.scheduler is None:
            cluster.close()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_sparse3d.api import run
    from napari_sparse3d.evaluation.metrics import annotated_slice_mask, dice_per_class
    from napari_sparse3d.evaluation.render import save_orthogonal_views
    from napari_sparse3d.io.arrays import load_array, save_array
    from napari_sparse3d.io.project import Project, is_project

    if not args.sample and args.image and not is_project(args.image):
        _spacing_from_file(args, args.image)
    kwargs = _train_kwargs(args)
    truth = None
    run_target: Any = None
    if args.sample:
        if args.image or args.labels:
            raise SystemExit("napari-sparse3d run: give either IMAGE LABELS or --sample, not both")
        if args.slices:
            raise ValueError("--slices does not apply to --sample: its annotated slices are --sample-slices per axis")
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
        if args.image and not Path(args.image).exists():
            raise ValueError(f"image: {args.image!r} does not exist (neither a file nor a project folder)")
        if not (args.image and args.labels):
            raise SystemExit("napari-sparse3d run: IMAGE and LABELS are required (or use --sample, or a project)")
        image, labels = load_array(args.image), load_array(args.labels, name="labels")
    out_dir = Path(args.output_dir)
    names = ["labels.tif", "model.pt", "views.png", "summary.json"] + (["image.tif", "annotations.tif"] if args.sample else [])
    inputs = [args.image, args.labels, args.init]
    for name in names:  # refuse before training, not after
        _check_target(out_dir / name, args.overwrite, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(args.quiet)
    with Interrupt(progress) as interrupt:
        res = run(run_target if run_target is not None else image, labels, progress=progress, stop=interrupt.stop,
                  **kwargs)
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
        "stopped_early": interrupt.stop.is_set(),
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


def _cmd_export(args: argparse.Namespace) -> int:
    from napari_sparse3d.modelzoo import export

    written = export(args.model, args.package, image=args.image, channel_axis=args.channel_axis, name=args.name,
                     license=args.license,
                     authors=args.author or ("napari-sparse3d user",), overwrite=args.overwrite)
    print(f"{args.model} -> {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # report format errors before loading anything
        if args.command == "train":
            volume_slices(args.slices, len(args.inputs))
        else:
            parse_slices(getattr(args, "slices", None))
        handler = {"train": _cmd_train, "predict": _cmd_predict, "run": _cmd_run, "project": _cmd_project,
                   "export": _cmd_export}[args.command]
        return handler(args)
    except (argparse.ArgumentTypeError, ValueError, TypeError, OSError, ModuleNotFoundError) as exc:
        parser.exit(2, f"napari-sparse3d {args.command}: error: {exc}\n")
    except FloatingPointError as exc:  # training diverged; the message says what to change
        parser.exit(1, f"napari-sparse3d {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\nnapari-sparse3d {args.command}: interrupted; outputs are written whole or not at all,"
                         " so none was left half-written\n")
    return 1


