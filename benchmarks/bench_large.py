"""A volume larger than memory should be comfortable with: time and peak memory of a zarr-to-zarr prediction.

Makes a 384x512x512 uint16 zarr volume with 64^3 chunks (blurred random
blobs, written chunk by chunk), a model with the default configuration
(trained briefly on the generated sample: prediction speed does not depend
on the weights), then runs ``napari-sparse3d predict model.pt volume.zarr
--format zarr`` in a fresh process and prints its wall time and peak
resident memory (``getrusage`` of the child).  The files live in
``benchmarks/data/large/`` (ignored by git) and are reused.

    python benchmarks/bench_large.py [--shape 384 512 512] [--chunks 64]

Appends its line to ``benchmarks/results/large.md``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import label_efficiency as le

FOLDER = le.DATA_DIR / "large"


def make_volume(path: Path, shape: tuple[int, ...], chunk: int) -> None:
    import zarr
    from scipy.ndimage import gaussian_filter

    if (path / "zarr.json").exists():
        return
    array = zarr.create_array(str(path), shape=shape, dtype="uint16", chunks=(chunk,) * 3)
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], chunk):  # a slab at a time: never the whole volume in memory
        slab = rng.random((min(chunk, shape[0] - z),) + tuple(shape[1:]), dtype=np.float32)
        slab = gaussian_filter(slab, 3) * 4000 + rng.normal(0, 100, slab.shape)
        array[z : z + slab.shape[0]] = np.clip(slab, 0, 65535).astype(np.uint16)


def make_model(path: Path) -> None:
    if path.exists():
        return
    import napari_sparse3d
    from napari_sparse3d.sample_data import evenly_spaced_slices, make_cells, sparse_annotations

    image, truth = make_cells()
    slices = evenly_spaced_slices(image.shape, 2)
    res = napari_sparse3d.run(image, sparse_annotations(truth, slices), annotated_slices=slices, max_iterations=20,
                              device="cpu", config={"predict": {"overlap": 0.0}})  # the prediction here is not timed
    # the checkpoint carries the default prediction settings, not the ones used above
    import dataclasses

    from napari_sparse3d.config import PredictConfig

    info = res.model.sparse3d
    res.model.sparse3d = dataclasses.replace(info, config=dataclasses.replace(info.config, predict=PredictConfig()))
    res.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=3, type=int, default=[384, 512, 512])
    parser.add_argument("--chunks", type=int, default=64)
    args = parser.parse_args()
    shape = tuple(args.shape)
    FOLDER.mkdir(parents=True, exist_ok=True)
    volume = FOLDER / f"volume-{'x'.join(map(str, shape))}.zarr"
    model = FOLDER / "model.pt"
    le.log(f"making {volume} ...")
    make_volume(volume, shape, args.chunks)
    make_model(model)
    out = FOLDER / "out"
    command = [sys.executable, "-m", "napari_sparse3d.cli", "predict", str(model), str(volume), "-o", str(out),
               "--format", "zarr", "--device", "cpu", "--quiet", "--overwrite"]  # a re-run replaces its own output
    le.log(" ".join(command))
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    from napari_sparse3d.io.arrays import load_array

    labels = load_array(out / f"{volume.name.split('.')[0]}_labels.zarr")  # an OME-Zarr image: its full resolution
    assert labels.shape == shape, labels.shape
    from napari_sparse3d.io.checkpoint import load_checkpoint

    predict_config = load_checkpoint(model).sparse3d.config.predict
    line = (f"| {'x'.join(map(str, shape))} uint16, {args.chunks}^3 chunks | {predict_config} | {seconds:.0f} s |"
            f" {np.prod(shape) / seconds / 1e6:.2f} Mvox/s | {peak_mb:.0f} MB |")
    print(line)
    results = le.RESULTS_DIR / "large.md"
    if not results.exists():
        results.write_text("# Large volume, zarr to zarr, fresh process (`python benchmarks/bench_large.py`)\n\n"
                           "| volume | prediction settings | time | speed | peak RSS |\n|---|---|---|---|---|\n")
    with results.open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
