"""The prediction after training, with the classifier's probabilities read from the trainer's map or computed again.

Training computes the pixel classifier's probabilities over each volume once (and
after each correction) and keeps them, as float16, for its samplers.  The
prediction that follows training (``napari_sparse3d.run``, the docks' final
prediction and their previews) reads them (``prior_map=``) instead of computing
them again.  This benchmark measures what that changes on the nuclei volume:
for both tasks, 1-3 annotated slices per axis and several seeds, one model is
trained (the default recipe, a fixed number of steps) and the whole volume is
predicted with the default settings both ways, in alternating order, from the
same weights.  Printed per cell: Dice outside the annotated slices both ways,
its change (mean, worst, best), the share of voxels whose label changed, and the
prediction's seconds both ways.

    python benchmarks/bench_prior_map.py [--steps 60] [--seeds 0 1 2 3 4] [--out benchmarks/results/prior_map]

Records go to ``OUT.jsonl`` as they finish (``--resume`` skips those already
there); the table to ``OUT.md``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import nuclei
from napari_sparse3d.engine.devices import resolve_precision
from napari_sparse3d.engine.prediction import predict_volume
from napari_sparse3d.engine.training import Trainer
from napari_sparse3d.engine.volume import as_volume

WAYS = ("computed", "map")


def one_model(image, truth, mask, sparse, slices, seed: int, steps: int) -> dict:
    trainer = Trainer.from_inputs(image, sparse, slices, spacing=nuclei.SPACING, device="cpu", seed=seed)
    for _ in trainer.steps(max_iterations=steps):
        pass
    trainer.release()
    volume, model = as_volume(image), trainer.model
    record: dict = {"precision": str(resolve_precision(trainer.device, trainer.config.train.precision))}
    labels = {}
    for way in (WAYS if seed % 2 == 0 else WAYS[::-1]):
        prior_map = trainer.data.prior_map(0) if way == "map" else None
        start = time.perf_counter()
        out, _ = predict_volume(volume, model, device="cpu", keep_probabilities=True, prior_map=prior_map)
        record[f"{way}_seconds"] = round(time.perf_counter() - start, 3)
        record[f"{way}_dice"] = round(nuclei.score(out, truth, mask)[0], 5)
        labels[way] = out
    record["labels_changed"] = float((labels["map"] != labels["computed"]).mean())
    return record


def table(records: list[dict]) -> list[str]:
    lines = [
        "| task | n/axis | seeds | Dice computed | Dice map | change: mean | worst | best | labels changed |"
        " seconds computed / map |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in ("three-class", "two-class"):
        for k in (1, 2, 3):
            rows = [r for r in records if r["task"] == task and r["k"] == k]
            if not rows:
                continue
            change = np.array([r["map_dice"] - r["computed_dice"] for r in rows])
            mean = {key: float(np.mean([r[key] for r in rows])) for key in
                    ("computed_dice", "map_dice", "labels_changed", "computed_seconds", "map_seconds")}
            lines.append(
                f"| {task} | {k} | {len(rows)} | {mean['computed_dice']:.4f} | {mean['map_dice']:.4f} |"
                f" {change.mean():+.5f} | {change.min():+.5f} | {change.max():+.5f} | {100 * mean['labels_changed']:.4f}% |"
                f" {mean['computed_seconds']:.2f} / {mean['map_seconds']:.2f} |"
            )
    change = np.array([r["map_dice"] - r["computed_dice"] for r in records])
    speed = np.array([r["computed_seconds"] / r["map_seconds"] for r in records])
    lines += ["", f"{len(records)} models; Dice change mean {change.mean():+.5f}, worst {change.min():+.5f},"
              f" best {change.max():+.5f}; prediction {np.median(speed):.2f}x faster (median over models,"
              f" {speed.min():.2f}-{speed.max():.2f}x); precision {sorted({r['precision'] for r in records})}"]
    return lines


def main(argv=None) -> int:
    args, jsonl, md, records = nuclei.grid_options(__doc__.splitlines()[0], "prior_map", argv)
    done = {(r["task"], r["k"], r["seed"]) for r in records}
    image, instances, source = nuclei.load_data()
    for task, k, seed, truth, slices, mask, sparse in nuclei.grid_cells(instances, args.seeds):
        if (task, k, seed) in done:
            continue
        record = {"task": task, "k": k, "seed": seed, "steps": args.steps,
                  **one_model(image, truth, mask, sparse, slices, seed, args.steps)}
        print(json.dumps(record), flush=True)
        nuclei.append_result(jsonl, record)
        records.append(record)
    nuclei.write_grid_report(
        md, "Prediction after training: the classifier's probabilities read from the trainer's map, or computed again",
        args, source,
        f"Nuclei volume {image.shape}; the default recipe trained {args.steps} steps per model, then the whole volume"
        " predicted with the default settings both ways from the same weights, in alternating order. Dice: mean"
        " foreground Dice outside the annotated slices.",
        table(records),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
