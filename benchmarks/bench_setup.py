"""How long a user waits before training starts, and for a run of one step: the trainer's set-up on the nuclei volume.

The set-up of a trainer (planning, normalisation statistics, the pixel classifier's
training samples, fit and probability map) comes out of every time budget, and a
``napari_sparse3d.run`` with one step is that set-up plus the whole-volume
prediction.  Three-class task, 2 annotated slices per axis; one warm-up, then
``--repeats`` of each, the seed changing each time.

    python benchmarks/bench_setup.py [--repeats 3]

To compare with another commit, run it once from a worktree of that commit
(``git worktree add /tmp/old COMMIT``) with ``PYTHONPATH=/tmp/old/src``, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import napari_sparse3d
import nuclei
from napari_sparse3d.engine.training import Trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    image, instances, _ = nuclei.load_data()
    truth = nuclei.make_truth(instances, "three-class")
    slices, _, sparse = nuclei.annotation(truth, 2)
    common = dict(spacing=nuclei.SPACING, device="cpu")
    Trainer.from_inputs(image, sparse, slices, seed=0, **common)  # warm-up
    setup, one_step = [], []
    for seed in range(1, args.repeats + 1):
        start = time.perf_counter()
        Trainer.from_inputs(image, sparse, slices, seed=seed, **common)
        setup.append(time.perf_counter() - start)
        start = time.perf_counter()
        napari_sparse3d.run(image, sparse, annotated_slices=slices, max_iterations=1, seed=seed, **common)
        one_step.append(time.perf_counter() - start)
    source = Path(napari_sparse3d.__file__).parent
    print(f"{source}: set-up {' '.join(f'{s:.2f}' for s in setup)} s (median {statistics.median(setup):.2f});"
          f" run with one step {' '.join(f'{s:.2f}' for s in one_step)} s (median {statistics.median(one_step):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
