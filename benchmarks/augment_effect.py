"""Each spatial augmentation on and off, on the real nuclei benchmark.

Trains ``napari_sparse3d.run`` (default configuration, CPU) on the nuclei volume
with ``--slices`` annotated slices per axis for ``--seconds`` per run, with the
paper's spatial augmentation parts switched on one at a time (``elastic``,
``rotate``, ``scale``), all together (``all``) or none (``none``, the default
recipe), over ``--seeds``; scores the mean foreground Dice outside the
annotated slices.  Output: ``benchmarks/results/augment_effect.{jsonl,md}``.

Command (from the repository root)::

    python benchmarks/augment_effect.py --task three-class --seconds 120 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import napari_sparse3d
from label_efficiency import annotation, load_data, make_truth, score

RESULTS = HERE / "results"
VARIANTS = {
    "none": {},
    "elastic": {"elastic": True},
    "rotate": {"rotate": True},
    "scale": {"scale": True},
    "all": {"elastic": True, "rotate": True, "scale": True},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="three-class", choices=["two-class", "three-class"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    image, instances, _ = load_data()
    truth = make_truth(instances, args.task)
    slices, mask, sparse = annotation(truth, args.slices)
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            res = napari_sparse3d.run(
                image, sparse, annotated_slices=slices, spacing=(0.29, 0.26, 0.26), max_seconds=args.seconds,
                seed=seed, device="cpu", config={"train": VARIANTS[variant]},
            )
            dice, _ = score(res.labels, truth, mask)
            record = {"task": args.task, "variant": variant, "seed": seed, "seconds": args.seconds,
                      "slices": args.slices, "dice": dice, "iterations": len(res.history)}
            rows.append(record)
            with (RESULTS / "augment_effect.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"seed {seed} {variant:8s}: Dice {dice:.3f} ({len(res.history)} it)", flush=True)
    lines = ["| augmentation | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | steps |",
             "|---|" + "---|" * (len(args.seeds) + 2)]
    for variant in args.variants:
        got = {r["seed"]: r for r in rows if r["variant"] == variant}
        cells = [f"{got[s]['dice']:.3f}" if s in got else "-" for s in args.seeds]
        mean = np.mean([r["dice"] for r in got.values()])
        steps = np.mean([r["iterations"] for r in got.values()])
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {mean:.3f} | {steps:.0f} |")
    table = "\n".join(lines)
    print(table)
    (RESULTS / "augment_effect.md").write_text(
        f"# Spatial augmentation on the nuclei {args.task} task, {args.slices} slices per axis,"
        f" {args.seconds:.0f} s, CPU\n\n`python benchmarks/augment_effect.py --task {args.task} --seconds"
        f" {args.seconds:g} --seeds {' '.join(map(str, args.seeds))} --variants {' '.join(args.variants)}`\n\n"
        + table + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
