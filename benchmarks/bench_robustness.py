"""Does training ever die or return a broken model?  Many short runs of the default recipe.

Trains the default configuration on the real nuclei volume (see
label_efficiency.py) for both tasks (two-class, three-class), 1, 2 and 3 fully
annotated slices per axis, seeds 0-4, ``--iterations`` steps each (default
100) — 30 runs per precision — and for each run records whether it raised,
how many steps were skipped for a non-finite loss or gradient, the final loss,
and whether every weight of the returned model, and of the checkpoint written
from it and read back, is finite.

``--precision auto`` is what a user gets (bfloat16 where the CPU has native
bf16, float32 elsewhere); ``bf16`` forces bfloat16 autocast, so that the
bfloat16 path is exercised on any CPU (oneDNN emulates it where it is not
native).  Before the fix in ``napari_sparse3d.model.Conv3d``, 9 of 12 bf16 runs
of 60 steps (1-2 slices, seeds 0-2) stopped with "training diverged".

    python benchmarks/bench_robustness.py [--precision auto bf16] [--iterations 100]

Each run is appended to ``benchmarks/results/robustness<tag>.jsonl`` as it finishes;
runs already there are not repeated (so several invocations, e.g. one per
precision, can share the work), and ``benchmarks/results/robustness<tag>.md`` (also
printed) is made from all the records of the requested settings.  ``--tag`` keeps
another engine's runs apart (``--tag _bag``: the engine with the bagged classifier).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import label_efficiency as le
from napari_sparse3d.config import Config
from napari_sparse3d.engine.devices import cpu_supports_bf16, resolve_precision
from napari_sparse3d.engine.training import Trainer
from napari_sparse3d.io.checkpoint import load_checkpoint, save_checkpoint


def finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def one_run(image, truth, n: int, seed: int, precision: str, iterations: int, folder: Path) -> dict:
    slices, _, sparse = le.annotation(truth, n)
    config = Config.from_dict({"train": {"precision": precision}})
    record = {"slices": n, "seed": seed, "error": None, "skipped": 0, "steps": 0, "loss": float("nan")}
    start = time.perf_counter()
    try:
        trainer = Trainer.from_inputs(image, sparse, slices, spacing=le.SPACING, config=config, device="cpu", seed=seed)
        record["dtype"] = str(trainer.precision).replace("torch.", "")
        for report in trainer.steps(max_iterations=iterations):
            record["steps"], record["loss"], record["skipped"] = report.iteration, report.loss, report.skipped
        record["finite"] = finite(trainer.model)
        path = save_checkpoint(trainer.model, folder / f"{n}-{seed}.pt")
        record["checkpoint_finite"] = finite(load_checkpoint(path))
    except Exception as exc:  # a failure is a result here, and the point of the benchmark
        record["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    record["seconds"] = time.perf_counter() - start
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", default=["auto", "bf16"], choices=["auto", "bf16", "fp32"])
    parser.add_argument("--tasks", nargs="+", default=list(le.TASKS), choices=le.TASKS)
    parser.add_argument("--slices", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--out", default=None, help="the table (default: results/robustness<tag>.md)")
    parser.add_argument("--tag", default="", help="suffix of the records and table files (another engine's runs)")
    parser.add_argument("--table-only", action="store_true", help="only make the table from the records")
    args = parser.parse_args()
    records_path = le.RESULTS_DIR / f"robustness{args.tag}.jsonl"
    args.out = args.out or str(le.RESULTS_DIR / f"robustness{args.tag}.md")
    done = {}
    for r in le.read_results(records_path):
        if r.get("iterations") == args.iterations:
            done[(r["precision"], r["task"], r["slices"], r["seed"])] = r
    image, instances, source = le.load_data()
    lines = [
        "# Robustness: short runs of the default recipe",
        "",
        f"Command: `python benchmarks/bench_robustness.py --precision {' '.join(args.precision)} --iterations"
        f" {args.iterations}{' --tag ' + args.tag if args.tag else ''}`"
        f" ({le.torch_info()[1]} threads, torch {torch.__version__}, native CPU bf16:"
        f" {cpu_supports_bf16()}; data: {source})",
        "",
        "| precision | task | slices/axis | runs | failures | non-finite models | skipped steps | mean final loss | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total_runs = total_bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            dtype = str(resolve_precision(torch.device("cpu"), precision)).replace("torch.", "")
            for task in args.tasks:
                truth = le.make_truth(instances, task)
                for n in args.slices:
                    records = []
                    for seed in args.seeds:
                        key = (precision, task, n, seed)
                        if key in done or args.table_only:
                            if key in done:
                                records.append(done[key])
                            continue
                        r = one_run(image, truth, n, seed, precision, args.iterations, Path(tmp))
                        r.update(precision=precision, task=task, iterations=args.iterations)
                        le.append_result(records_path, r)
                        records.append(r)
                        le.log(f"{precision} {task} n={n} seed={seed}: steps {r['steps']} skipped {r['skipped']}"
                               f" loss {r['loss']:.4f} finite {r.get('finite')}/{r.get('checkpoint_finite')}"
                               f" error {r['error']} ({r['seconds']:.0f} s)")
                    if not records:
                        continue
                    failures = sum(r["error"] is not None for r in records)
                    broken = sum(not (r.get("finite") and r.get("checkpoint_finite")) for r in records if r["error"] is None)
                    total_runs += len(records)
                    total_bad += failures + broken
                    losses = [r["loss"] for r in records if r["error"] is None]
                    lines.append(
                        f"| {precision} ({dtype}) | {task} | {n} | {len(records)} | {failures} | {broken} |"
                        f" {sum(r['skipped'] for r in records)} | {np.mean(losses) if losses else float('nan'):.4f} |"
                        f" {np.mean([r['seconds'] for r in records]):.0f} |"
                    )
    lines += ["", f"**{total_bad} failed or non-finite of {total_runs} runs.**", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
