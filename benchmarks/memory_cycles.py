"""Memory across repeated train/stop cycles in one process (what a long napari session does).

Each cycle does what Start, then Stop, does in the training dock: build a
Trainer, run :func:`napari_sparse3d.jobs.training_job` with previews, stop it
after ``--steps`` steps, and let it predict the whole volume block by block.
After each cycle the process's resident memory (RSS, from /proc) is printed,
and on CUDA the allocated GPU memory too, which must return to its baseline.

    python benchmarks/memory_cycles.py                 # 10 cycles, CPU
    python benchmarks/memory_cycles.py --device cuda   # on a GPU

The last line says whether RSS grew: the growth from cycle 3 to the last cycle
(cycles 1-2 warm up allocator pools and kernel caches) divided by the number
of cycles, in MB per cycle.
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--steps", type=int, default=40, help="training steps before Stop")
    p.add_argument("--shape", type=int, nargs=3, default=(48, 96, 96))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from napari_sparse3d.engine.prediction import Block
    from napari_sparse3d.engine.training import Trainer
    from napari_sparse3d.loop.jobs import Phase, Preview, training_job
    from napari_sparse3d.sample_data import evenly_spaced_slices, make_cells, sparse_annotations

    image, truth = make_cells(tuple(args.shape), classes=3, seed=0)
    slices = evenly_spaced_slices(image.shape, 2)
    labels = sparse_annotations(truth, slices)
    cuda = args.device.startswith("cuda")
    region = (slice(image.shape[0] // 2, image.shape[0] // 2 + 1), slice(None), slice(None))
    print(f"torch {torch.__version__}, device {args.device}, volume {image.shape}, {args.steps} steps per cycle")
    print("cycle  steps  previews  blocks  seconds  RSS MB" + ("  CUDA alloc MB  CUDA reserved MB" if cuda else ""))
    if cuda:
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated() / 2**20
    rss = []
    for cycle in range(1, args.cycles + 1):
        t0 = time.perf_counter()
        trainer = Trainer.from_inputs(image, labels, slices, device=args.device, seed=cycle)
        stop = threading.Event()
        steps = previews = blocks = 0
        for item in training_job(trainer, stop=stop, view=lambda: region, preview_every=1.0):
            if isinstance(item, Preview):
                previews += 1
            elif isinstance(item, Block):
                blocks += 1
            elif not isinstance(item, Phase) and hasattr(item, "loss"):
                steps += 1
                if steps >= args.steps:
                    stop.set()
        del trainer, item
        gc.collect()
        line = f"{cycle:5d}  {steps:5d}  {previews:8d}  {blocks:6d}  {time.perf_counter() - t0:7.1f}  {rss_mb():6.0f}"
        if cuda:
            torch.cuda.synchronize()
            line += f"  {torch.cuda.memory_allocated() / 2**20 - base_alloc:13.1f}  {torch.cuda.memory_reserved() / 2**20:16.1f}"
        rss.append(rss_mb())
        print(line, flush=True)
    if len(rss) >= 4:
        per_cycle = (rss[-1] - rss[2]) / (len(rss) - 3)
        print(f"RSS growth from cycle 3 to {len(rss)}: {rss[-1] - rss[2]:+.1f} MB ({per_cycle:+.2f} MB per cycle)")
    if cuda:
        above = torch.cuda.memory_allocated() / 2**20 - base_alloc
        print(f"CUDA allocated after the last cycle, above the baseline: {above:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
