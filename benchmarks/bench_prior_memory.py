"""Peak memory and time of the pixel classifier's probabilities on one large box, by block size.

A prediction tile's input is the tile plus the margins of the windows that touch it:
for a tile of 8 M voxels inside a large volume, 20-30 M voxels. The pixel classifier's
probabilities (:func:`napari_sparse3d.engine.pixel_head.prior`) are computed on all of
it, and the filter bank holds dozens of floats per voxel. This benchmark runs ``prior``
on one box of ``--shape`` voxels (uint16 noise, a 3-class classifier fitted for a few
steps: the cost does not depend on the weights), once per block size, each in a fresh
process, and prints the time and the process's peak RSS.

    python benchmarks/bench_prior_memory.py [--shape 160 420 420] [--blocks 0 16777216 8388608 2097152]

Block size 0 computes the whole box at once (what prediction did before blocks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import numpy as np, torch
from napari_sparse3d.engine.pixel_head import PixelClassifier, prior
from napari_sparse3d.engine.preprocess import compute_normalization
from napari_sparse3d.engine.volume import as_volume

block, shape = int(sys.argv[1]), tuple(int(v) for v in sys.argv[2:5])
image = np.random.default_rng(0).integers(900, 1400, size=shape, dtype=np.uint16)
volume = as_volume(image)
norm = compute_normalization(volume)
head = PixelClassifier(1, 3)
head.fit(torch.randn(20_000, head.mean.numel()), torch.randint(0, 3, (20_000,)), seed=0, steps=20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
probs = prior(head, volume, norm, tuple(slice(0, s) for s in shape), block_voxels=block or 1 << 62)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"block_voxels": block, "seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 420, 420])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 1 << 24, 1 << 23, 1 << 21])
    args = parser.parse_args()
    voxels = args.shape[0] * args.shape[1] * args.shape[2]
    print(f"box {'x'.join(map(str, args.shape))} ({voxels / 1e6:.1f} M voxels)")
    print("| block voxels | seconds | peak RSS (MiB) |\n|---|---|---|")
    for block in args.blocks:
        out = subprocess.run([sys.executable, "-c", CHILD, str(block), *map(str, args.shape)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        name = "whole box" if block == 0 else f"{block / 2**20:g} Mi"
        print(f"| {name} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
