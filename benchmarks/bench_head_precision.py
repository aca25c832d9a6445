"""The pixel classifier's probabilities in bfloat16 or float32: set-up time and Dice of the default recipe.

Where the trainer's precision is bfloat16 (a CPU with native bfloat16, or a GPU), the
classifier's perceptrons compute their products in bfloat16, for the trainer's map and
for prediction alike.  This benchmark runs ``napari_sparse3d.run`` (the default recipe,
a fixed number of steps) on the nuclei volume for both tasks, 1-3 annotated slices per
axis and several seeds, once with bfloat16 probabilities and once with float32 ones
(forced), interleaved, and prints per cell the Dice outside the annotated slices both
ways, its change, the trainer's set-up seconds (the classifier's fit and its map) and
the map's seconds.

    python benchmarks/bench_head_precision.py [--steps 60] [--seeds 0 1 2 3 4] [--out benchmarks/results/head_precision]

Records go to ``OUT.jsonl`` as they finish (``--resume`` skips those there); the table to ``OUT.md``.
On a machine whose precision resolves to float32 both variants are the same.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import napari_sparse3d
import nuclei
from napari_sparse3d.engine import training_data
from napari_sparse3d.engine.pixel_head import PixelClassifier

VARIANTS = ("fp32-probabilities", "bf16-probabilities")


def instrument(state: dict) -> None:
    """Force float32 probabilities in the float32 variant; time the set-up and the map."""
    probabilities, probability_map = PixelClassifier.probabilities, training_data.probability_map
    from_inputs = training_data.TrainingData.__init__

    def forced(self, image, dtype=torch.float32):
        state["dtype"] = str(dtype if state["variant"] == VARIANTS[1] else torch.float32)
        return probabilities(self, image, dtype if state["variant"] == VARIANTS[1] else torch.float32)

    def timed_map(*args, **kwargs):
        start = time.perf_counter()
        out = probability_map(*args, **kwargs)
        state["map_s"] = time.perf_counter() - start
        return out

    def timed_data(self, *args, **kwargs):
        start = time.perf_counter()
        from_inputs(self, *args, **kwargs)
        state["data_s"] = time.perf_counter() - start

    PixelClassifier.probabilities = forced
    training_data.probability_map = timed_map
    training_data.TrainingData.__init__ = timed_data


def table(records: list[dict]) -> list[str]:
    lines = [
        "| task | n/axis | seeds | Dice fp32 | Dice bf16 | change: mean | worst | best |"
        " training data set-up s fp32 / bf16 | map s fp32 / bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = []
    for task in ("three-class", "two-class"):
        for k in (1, 2, 3):
            rows = {(r["seed"], r["variant"]): r for r in records if r["task"] == task and r["k"] == k}
            seeds = sorted({s for s, _ in rows if all((s, v) in rows for v in VARIANTS)})
            if not seeds:
                continue
            a = [rows[(s, VARIANTS[0])] for s in seeds]
            b = [rows[(s, VARIANTS[1])] for s in seeds]
            change = np.array([y["dice"] - x["dice"] for x, y in zip(a, b)])
            pairs += list(change)

            def mean(rs, key):
                return float(np.mean([r[key] for r in rs]))

            lines.append(
                f"| {task} | {k} | {len(seeds)} | {mean(a, 'dice'):.4f} | {mean(b, 'dice'):.4f} | {change.mean():+.4f} |"
                f" {change.min():+.4f} | {change.max():+.4f} | {mean(a, 'data_s'):.1f} / {mean(b, 'data_s'):.1f} |"
                f" {mean(a, 'map_s'):.2f} / {mean(b, 'map_s'):.2f} |"
            )
    pairs = np.array(pairs)
    if pairs.size:
        lines += ["", f"{pairs.size} pairs, mean change {pairs.mean():+.4f}, worst {pairs.min():+.4f}, best"
                  f" {pairs.max():+.4f}; {int((pairs > 0).sum())} gained, {int((pairs < 0).sum())} lost; all finite:"
                  f" {all(r['finite'] for r in records)}; runs: {len(records)}"]
    return lines


def main(argv=None) -> int:
    args, jsonl, md, records = nuclei.grid_options(__doc__.splitlines()[0], "head_precision", argv)
    done = {(r["task"], r["k"], r["seed"], r["variant"]) for r in records}
    state: dict = {}
    instrument(state)
    image, instances, source = nuclei.load_data()
    for task, k, seed, truth, slices, mask, sparse in nuclei.grid_cells(instances, args.seeds):
        for variant in (VARIANTS if seed % 2 == 0 else VARIANTS[::-1]):
            if (task, k, seed, variant) in done:
                continue
            state.update(variant=variant, dtype=None)
            start = time.perf_counter()
            res = napari_sparse3d.run(image, sparse, annotated_slices=slices, spacing=nuclei.SPACING,
                                      max_iterations=args.steps, device="cpu", seed=seed)
            seconds = time.perf_counter() - start
            finite = all(bool(torch.isfinite(v).all()) for v in res.model.state_dict().values() if v.is_floating_point())
            record = {"task": task, "k": k, "seed": seed, "variant": variant, "steps": args.steps,
                      "dice": round(nuclei.score(np.asarray(res.labels), truth, mask)[0], 5),
                      "data_s": round(state["data_s"], 2), "map_s": round(state["map_s"], 2),
                      "probability_dtype": state["dtype"], "seconds": round(seconds, 1), "finite": finite}
            print(json.dumps(record), flush=True)
            nuclei.append_result(jsonl, record)
            records.append(record)
    nuclei.write_grid_report(
        md, "The pixel classifier's probabilities in bfloat16 or float32", args, source,
        f"`napari_sparse3d.run`, {args.steps} steps, nuclei volume {image.shape}, interleaved; Dice: mean foreground"
        " Dice outside the annotated slices. 'training data set-up': the classifier's samples, fit and map (the"
        " trainer's set-up less the network's planning).",
        table(records),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
