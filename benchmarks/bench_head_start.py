"""The default recipe (pixel classifier + 3D U-Net) on the nuclei benchmark, over seeds and annotation densities.

For each task, annotated slices per axis and seed, ``napari_sparse3d.run`` trains
with the default configuration for ``--budget`` seconds (the classifier's fit
counts against the budget) and predicts the whole volume; the score is the mean
foreground Dice outside the annotated slices, as in ``label_efficiency.py``.
Also recorded: the Dice of the pixel classifier alone (the network's starting
point, read from the trained model) and the forest's Dice from
``results/label_efficiency.jsonl`` (deterministic, not re-run).

Each run is appended to ``results/head_start.jsonl`` as it finishes; runs
already there are skipped (delete the file to start over).  The table goes to
``results/head_start.md``.

    python benchmarks/bench_head_start.py --tasks three-class --slices 2 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import label_efficiency as le
import napari_sparse3d
from napari_sparse3d.engine.pixel_head import probability_map
from napari_sparse3d.engine.volume import as_volume

RESULTS = le.RESULTS_DIR / "head_start.jsonl"


def forest_dice() -> dict[tuple[str, int], float]:
    return {(r["task"], r["slices"]): r["dice"] for r in le.read_results(le.RESULTS_DIR / "label_efficiency.jsonl")
            if r.get("method") == "forest" and not r.get("quick")}


def one_run(image, truth, n, seed, budget, config) -> dict:
    slices, mask, sparse = le.annotation(truth, n)
    t0 = time.perf_counter()
    res = napari_sparse3d.run(image, sparse, annotated_slices=slices, spacing=le.SPACING, max_seconds=budget, seed=seed,
                              config=config)
    total = time.perf_counter() - t0
    dice, per_class = le.score(np.asarray(res.labels), truth, mask)
    record = dict(dice=dice, dice_per_class=per_class, iterations=len(res.history), total_seconds=total,
                  skipped=sum(h.skipped for h in res.history),
                  finite=all(bool(torch.isfinite(v).all()) for v in res.model.state_dict().values() if v.is_floating_point()))
    head = getattr(res.model, "pixel_head", None)
    if head is not None:
        info = res.model.sparse3d
        volume = as_volume(image)
        probs = probability_map(head, volume, info.normalization.for_volume(volume))
        record["classifier_dice"] = le.score(np.asarray(info.class_values)[probs.argmax(0)], truth, mask)[0]
    vals = [h.val_dice for h in res.history if h.val_dice is not None]
    record["val_dice_first_last"] = [vals[0], vals[-1]] if vals else None
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["three-class"], choices=le.TASKS)
    p.add_argument("--slices", nargs="+", type=int, default=[2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--budget", type=float, default=120.0)
    p.add_argument("--no-classifier", action="store_true", help="the network alone (model.pixel_classifier false)")
    p.add_argument("--results", default="head_start", help="stem of the results files under results/ (.jsonl, .md)")
    p.add_argument("--label", default="", help="appended to the variant's name (e.g. the code version measured)")
    args = p.parse_args()
    global RESULTS
    RESULTS = le.RESULTS_DIR / f"{args.results}.jsonl"
    variant = ("unet" if args.no_classifier else "classifier+unet") + (f" ({args.label})" if args.label else "")
    config = {"model": {"pixel_classifier": False}} if args.no_classifier else None
    done = {(r["variant"], r["task"], r["slices"], r["seed"], r["budget"]) for r in le.read_results(RESULTS)}
    image, instances, source = le.load_data()
    for task in args.tasks:
        truth = le.make_truth(instances, task)
        for n in args.slices:
            for seed in args.seeds:
                key = (variant, task, n, seed, args.budget)
                if key in done:
                    continue
                r = one_run(image, truth, n, seed, args.budget, config)
                r.update(variant=variant, task=task, slices=n, seed=seed, budget=args.budget,
                         threads=torch.get_num_threads(), torch_version=torch.__version__)
                le.append_result(RESULTS, r)
                le.log(f"{variant} {task} n={n} seed={seed}: Dice {r['dice']:.4f} (classifier"
                       f" {r.get('classifier_dice', float('nan')):.4f}) it {r['iterations']} total {r['total_seconds']:.0f} s")
    write_table(source, args.results)


def write_table(source: str, stem: str = "head_start") -> None:
    forest = forest_dice()
    rows: dict[tuple, list[dict]] = {}
    for r in le.read_results(RESULTS):
        rows.setdefault((r["variant"], r["task"], r["slices"], r["budget"]), []).append(r)
    lines = [
        "# Pixel classifier + 3D U-Net on the nuclei benchmark",
        "",
        f"`python benchmarks/bench_head_start.py ...` (data: {source}; {torch.get_num_threads()} threads, torch"
        f" {torch.__version__}). Mean foreground Dice outside the annotated slices; the budget includes the"
        " classifier's fit; 'total' adds the whole-volume prediction.",
        "",
        "| variant | task | slices/axis | budget s | seeds | Dice mean | min | max | classifier alone (mean) | forest |"
        " iterations | total s | non-finite / skipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, task, n, budget), rs in sorted(rows.items()):
        d = [r["dice"] for r in rs]
        c = [r["classifier_dice"] for r in rs if "classifier_dice" in r]
        lines.append(
            f"| {variant} | {task} | {n} | {budget:.0f} | {','.join(str(r['seed']) for r in rs)} | {np.mean(d):.3f} |"
            f" {min(d):.3f} | {max(d):.3f} | {np.mean(c):.3f} |" if c else
            f"| {variant} | {task} | {n} | {budget:.0f} | {','.join(str(r['seed']) for r in rs)} | {np.mean(d):.3f} |"
            f" {min(d):.3f} | {max(d):.3f} | - |"
        )
        lines[-1] += (f" {forest.get((task, n), float('nan')):.3f} | {np.mean([r['iterations'] for r in rs]):.0f} |"
                      f" {np.mean([r['total_seconds'] for r in rs]):.0f} |"
                      f" {sum(not r['finite'] for r in rs)} / {sum(r['skipped'] for r in rs)} |")
    text = "\n".join(lines) + "\n"
    (le.RESULTS_DIR / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
