"""Prediction of a large zarr volume in one process and on a dask.distributed LocalCluster.

A uint16 zarr volume (default 256x1024x1024, 64^3 chunks) of blob-like objects
in noise is generated in ``--folder``; a model with the default configuration
(pixel classifier + 3D U-Net) is trained on two annotated slices of its first
64 z-slices for ``--train-seconds``.  Then the whole volume is predicted
zarr-to-zarr:

1. in one process: the console command ``napari-sparse3d predict`` in a fresh
   process (wall time and its peak RSS);
2. on a ``LocalCluster`` of ``--workers`` worker processes, one thread each
   (wall time, each worker's peak RSS, and whether the labels equal the
   single-process ones).

The speed-up to expect is about the number of cores the workers get: on a
machine of 2 cores, the single process already uses both (torch threads), so
two single-threaded workers can at best match it; the point here is that the
distributed path adds little overhead and bounded memory per worker.

    python benchmarks/bench_cluster.py [--shape 256 1024 1024] [--workers 2] [--folder /tmp/sparse3d-cluster]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

import napari_sparse3d


def make_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """Blocky objects (a coarse random field, thresholded) plus noise, written slab by slab."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((-(-shape[0] // 8), -(-shape[1] // 16), -(-shape[2] // 16))) > 0.8
    z = zarr.create_array(str(path), shape=shape, dtype="uint16", chunks=(64, 64, 64), overwrite=True)
    for z0 in range(0, shape[0], 64):
        z1 = min(z0 + 64, shape[0])
        zz = np.arange(z0, z1)[:, None, None] // 8
        yy = np.arange(shape[1])[None, :, None] // 16
        xx = np.arange(shape[2])[None, None, :] // 16
        mask = coarse[zz, yy, xx]
        z[z0:z1] = (1000 + 700 * mask + rng.normal(0, 150, mask.shape)).clip(0, 65535).astype(np.uint16)


def train_model(image_path: Path, model_path: Path, seconds: float) -> None:
    part = np.asarray(zarr.open_array(str(image_path), mode="r")[:64, :256, :256])
    truth = part > 1350
    labels = np.zeros(part.shape, np.uint8)
    labels[32] = truth[32] + 1
    labels[:, 128] = truth[:, 128] + 1
    res = napari_sparse3d.run(part, labels, annotated_slices={0: [32], 1: [128]}, max_seconds=seconds, seed=0)
    res.save(model_path)


def single_process(image: Path, model: Path, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "napari_sparse3d.cli", "predict", str(model), str(image), "-o", str(out),
                    "--format", "zarr", "--overwrite", "--quiet"], check=True)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB (Linux: KiB)


def _peak_rss_mib() -> float:
    import resource as r

    return r.getrusage(r.RUSAGE_SELF).ru_maxrss / 1024


def on_cluster(image: Path, model: Path, out: Path, workers: int) -> tuple[float, dict, int]:
    from distributed import Client, LocalCluster

    from napari_sparse3d.distributed import predict_distributed

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        start = time.perf_counter()
        result = predict_distributed(image, model, out, client=client, overwrite=True)
        seconds = time.perf_counter() - start
        rss = client.run(_peak_rss_mib)
        return seconds, rss, result.tiles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 1024, 1024])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-seconds", type=float, default=30.0)
    p.add_argument("--folder", default="/tmp/sparse3d-cluster")
    args = p.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    image, model = folder / "image.zarr", folder / "model.pt"
    shape = tuple(args.shape)
    t0 = time.perf_counter()
    make_volume(image, shape)
    print(f"volume {shape} uint16 ({np.prod(shape) * 2 / 2**30:.2f} GiB) written in {time.perf_counter() - t0:.0f} s",
          flush=True)
    train_model(image, model, args.train_seconds)
    single_s, single_rss = single_process(image, model, folder / "single")
    print(f"single process: {single_s:.0f} s, peak RSS {single_rss:.0f} MiB", flush=True)
    cluster_s, rss, tiles = on_cluster(image, model, folder / "cluster.zarr", args.workers)
    same = bool(np.array_equal(np.asarray(zarr.open_group(str(folder / "single" / "image_labels.zarr"))["0"][::4]),
                               np.asarray(zarr.open_group(str(folder / "cluster.zarr"))["0"][::4])))
    voxels = float(np.prod(shape))
    record = {
        "shape": list(shape), "workers": args.workers, "tiles": tiles,
        "single_seconds": single_s, "single_mvox_s": voxels / single_s / 1e6, "single_peak_rss_mib": single_rss,
        "cluster_seconds": cluster_s, "cluster_mvox_s": voxels / cluster_s / 1e6,
        "worker_peak_rss_mib": sorted(rss.values()), "labels_equal_every_4th_slice": same,
        "speedup": single_s / cluster_s,
    }
    print(json.dumps(record, indent=1))
    results = Path(__file__).parent / "results" / "cluster.jsonl"
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
