"""What does the 3D U-Net paper's spatial augmentation (engine/deform.py) cost per training batch?

Times :class:`SpatialAugment` on random batches of the default patch (4 x 1 x 16 x 48 x 48) and of a
large one (2 x 1 x 64 x 64 x 64), each part alone (elastic, rotate, scale) and all together, with every
sample transformed (probability 1, the worst case) and at the default probability of 1/2.  The image
is in channels_last_3d as in training.  Median milliseconds of 50 calls after 5 warm-up calls, on the
CPU (torch's default threads unless --threads) and on CUDA where available; for the CPU also the
median process CPU time per call, which a busy shared machine distorts less than wall time (run
with --threads 1 there: OpenMP threads that wait for a core inflate both).  Augmentation parameters
are the TrainConfig defaults (sigma 4 voxels on a 32-voxel grid, 30 degrees, zoom 0.85-1.15).

    python benchmarks/bench_augment.py [--calls 50] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_sparse3d.config import TrainConfig
from napari_sparse3d.engine.deform import SpatialAugment

SHAPES = {"4 x 1 x 16 x 48 x 48": (4, 1, 16, 48, 48), "2 x 1 x 64 x 64 x 64": (2, 1, 64, 64, 64)}
PARTS = {
    "elastic": ({"elastic": True}, 1.0),
    "rotate": ({"rotate": True}, 1.0),
    "scale": ({"scale": True}, 1.0),
    "all": ({"elastic": True, "rotate": True, "scale": True}, 1.0),
    "all, p = 0.5": ({"elastic": True, "rotate": True, "scale": True}, 0.5),
}


def milliseconds(augment: SpatialAugment, shape: tuple[int, ...], device: str, calls: int) -> tuple[float, float]:
    """Median wall and process CPU milliseconds per call."""
    generator = torch.Generator().manual_seed(0)
    data = torch.Generator().manual_seed(1)
    image = torch.randn(shape, generator=data).to(device).contiguous(memory_format=torch.channels_last_3d)
    target = torch.randint(-1, 3, (shape[0], *shape[2:]), generator=data).to(device)
    weight = (target >= 0).float()
    wall, cpu = [], []
    for call in range(calls + 5):
        if device == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        augment(image, target, weight, generator)
        if device == "cuda":
            torch.cuda.synchronize()
        if call >= 5:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    defaults = TrainConfig()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ", no CUDA"))
    header = " | ".join(["cpu ms", "cpu process-time ms"] + (["cuda ms"] if "cuda" in devices else []))
    print(f"\n| batch | part | {header} |\n|---|---|{'---|' * (len(devices) + 1)}")
    for label, shape in SHAPES.items():
        for part, (switches, probability) in PARTS.items():
            options = {"elastic": False, "rotate": False, "scale": False, **switches}
            train = TrainConfig(**options, spatial_probability=probability)
            augment = SpatialAugment.from_config(train, None)
            assert augment.elastic_sigma == defaults.elastic_sigma and augment.rotate_degrees == defaults.rotate_degrees
            wall, cpu = milliseconds(augment, shape, "cpu", args.calls)
            cells = f"{wall:.2f} | {cpu:.2f}"
            if "cuda" in devices:
                cells += f" | {milliseconds(augment, shape, 'cuda', args.calls)[0]:.2f}"
            print(f"| {label} | {part} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
