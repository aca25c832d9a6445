"""Does CPU mixed precision cost accuracy?  bfloat16 + channels_last_3d versus float32.

Trains the same network from the same seed for the same number of steps on
the nuclei volume (three-class task, 2 annotated slices per axis, see
label_efficiency.py) once per precision setting, and prints seconds per step
and the Dice outside the annotated slices.  Equal step counts isolate the
numerical effect of bf16; the speed-up is what it buys within a time budget.

    python benchmarks/bench_precision.py [--iterations 300] [--task three-class]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import label_efficiency as le
import napari_sparse3d
from napari_sparse3d.engine.devices import cpu_supports_bf16

SETTINGS = {
    "fp32": {"precision": "fp32", "channels_last": False},
    "fp32 + channels_last_3d": {"precision": "fp32", "channels_last": True},
    "bf16 + channels_last_3d": {"precision": "bf16", "channels_last": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--task", default="three-class", choices=le.TASKS)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    image, instances, _ = le.load_data()
    truth = le.make_truth(instances, args.task)
    slices, annotated, sparse = le.annotation(truth, args.slices)
    print(f"CPU has native bf16: {cpu_supports_bf16()}; task {args.task}, {args.slices} slices/axis, "
          f"{args.iterations} steps, seed {args.seed}")
    rows = []
    for name, train in SETTINGS.items():
        start = time.perf_counter()
        res = napari_sparse3d.run(
            image, sparse, annotated_slices=slices, spacing=le.SPACING, max_iterations=args.iterations,
            device="cpu", seed=args.seed, config={"train": train},
        )
        total = time.perf_counter() - start
        step = float(np.median([h.step_seconds for h in res.history]))
        dice, per_class = le.score(res.labels, truth, annotated)
        rows.append((name, step, res.history[-1].elapsed, total - res.history[-1].elapsed, dice, per_class))
        timing = f"{step:.3f} s/step  train {rows[-1][2]:.0f} s  predict {rows[-1][3]:.1f} s"
        print(f"{name:26s} {timing}  dice {dice:.3f} {per_class}",
              flush=True)
    base = rows[0]
    print("\n| setting | s/step | speed-up | predict s | speed-up | Dice |\n|---|---|---|---|---|---|")
    for name, step, _, pred, dice, _ in rows:
        print(f"| {name} | {step:.3f} | {base[1] / step:.1f}x | {pred:.1f} | {base[3] / pred:.1f}x | {dice:.3f} |")


if __name__ == "__main__":
    main()
