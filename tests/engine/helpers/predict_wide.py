"""Predict a (Z, Y, X) zarr volume into zarr in this fresh process; print the peak RSS growth in MB.

Used by tests/test_prediction.py: ``python predict_wide.py FOLDER Z Y X``.
"""

import resource
import sys

import numpy as np
import torch
import zarr

import napari_sparse3d
from napari_sparse3d.config import Config
from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.trained import ModelInfo


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    folder, shape = sys.argv[1], tuple(int(v) for v in sys.argv[2:5])
    torch.set_num_threads(1)
    image = zarr.create_array(f"{folder}/image.zarr", shape=shape, dtype="uint16", chunks=(8, 256, 256), fill_value=7)
    image[:, :64, :64] = np.random.default_rng(0).integers(0, 1000, (shape[0], 64, 64), dtype=np.uint16)
    cfg = Config.from_dict(
        {
            "model": {"levels": 2, "base_features": 2, "pixel_classifier": False},
            "train": {"patch_size": [8, 32, 32], "precision": "fp32"},
            "predict": {"overlap": 0.25, "mirror_tta": False, "window": "patch", "tile_voxels": 2**18},
        }
    )
    torch.manual_seed(0)
    model = UNet3D(1, 2, cfg.model).eval()
    model.sparse3d = ModelInfo(cfg, [0, 1], Normalization((0.0,), (1000.0,), (500.0,), (300.0,)), (8, 32, 32), None, 1)
    before = peak_mb()
    napari_sparse3d.predict(f"{folder}/image.zarr", model, out=f"{folder}/labels.zarr", device="cpu")
    print(f"{peak_mb() - before:.1f}")


if __name__ == "__main__":
    main()
