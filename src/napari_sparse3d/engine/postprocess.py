"""Post-processing of a dense prediction: fragments removed, objects split into instances.

numpy, scipy.ndimage and scikit-image only (no torch); arrays in, arrays out, inputs never modified.

:func:`clean_labels`
    Per class value, removes connected components smaller than ``min_size`` voxels (and,
    for chosen classes, every component but the largest).  A removed voxel takes the value
    of the nearest voxel that was kept, so a speck of "boundary" inside a nucleus becomes
    "interior" and a speck floating in the background becomes background.
:func:`instances_from_prediction`
    Seeded watershed of a class prediction (labels, or class probabilities) into instances:
    the connected components of the interior class are the seeds, interior ∪ boundary is
    flooded, along the boundary probability (or the distance to the seeds).  The nuclei task
    of this project is three-class: 0 background, 1 interior, 2 boundary, where the boundary
    is ``skimage.segmentation.find_boundaries(instances, mode="inner")``.

Both are whole-volume operations (a watershed is global) and take a few seconds for a
volume of millions of voxels; see each function for time and memory.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["clean_labels", "instances_from_prediction"]


# -- argument checks ------------------------------------------------------------------------
def _int_arg(value: Any, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _int_values(values: Any, name: str) -> tuple[int, ...]:
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        return (int(values),)
    if isinstance(values, (str, bytes, bool)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be an iterable of integer class values, got {values!r}")
    return tuple(_int_arg(v, f"{name}[{i}]") for i, v in enumerate(values))


def _labels_arg(labels: Any, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label array, got dtype {array.dtype}")
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D (Y, X) or 3D (Z, Y, X), got {array.ndim}D with shape {array.shape}")
    return array


def _connectivity_arg(connectivity: Any, ndim: int) -> np.ndarray:
    c = _int_arg(connectivity, "connectivity")
    if not 1 <= c <= ndim:
        raise ValueError(f"connectivity must be 1 (faces) to {ndim} (corners) for {ndim}D data, got {c}")
    return ndimage.generate_binary_structure(ndim, c)


def _spacing_arg(spacing: Any, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise TypeError(f"spacing must be a sequence of {ndim} numbers, got {spacing!r}") from None
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} finite positive numbers (one per axis), got {spacing!r}")
    return values


def _nearest_kept(values: np.ndarray, removed: np.ndarray, fill: int, sampling: tuple[float, ...] | None) -> None:
    """Give each ``removed`` voxel of ``values`` (in place) the value of the nearest voxel that is not removed.

    Only the bounding box of the removed voxels, grown by one voxel, is transformed: the
    nearest kept voxel of a voxel inside a box is never farther than the box's outer layer,
    which holds kept voxels only (project the nearest voxel onto the box), so the answer is
    the whole volume's.  With no kept voxel at all, ``fill``.
    """
    where = np.nonzero(removed)
    lo = [max(int(w.min()) - 1, 0) for w in where]
    hi = [min(int(w.max()) + 2, s) for w, s in zip(where, removed.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    gone = removed[box]
    if gone.all():
        values[box][gone] = fill
        return
    index = ndimage.distance_transform_edt(gone, sampling=sampling, return_distances=False, return_indices=True)
    crop = values[box]
    crop[gone] = crop[tuple(i[gone] for i in index)]


# -- fragments --------------------------------------------------------------------------------
def clean_labels(
    labels: Any,
    *,
    min_size: int = 0,
    keep_largest: Iterable[int] | int = (),
    background: int = 0,
    connectivity: int = 1,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Remove small fragments of each class, optionally keeping only the largest object of some classes.

    Parameters
    ----------
    labels : array of int, (Y, X) or (Z, Y, X)
        A class label image (the user's label values).  Not modified.
    min_size : int
        Connected components of a class with fewer voxels are removed (0: none).
    keep_largest : iterable of int, or int
        Class values of which only the largest connected component is kept (e.g. one organ).
    background : int
        The background value: its components are never removed, and it is what a removed
        voxel becomes when no voxel at all is kept.
    connectivity : int
        Which neighbours connect voxels of a component: 1 faces, 2 also edges, 3 also corners.
    spacing : sequence of float, optional
        Voxel size per axis, for "nearest" below (default isotropic).

    Returns
    -------
    ndarray
        A new array of the same shape and dtype.

    Notes
    -----
    **What a removed voxel becomes.**  The value of the nearest voxel that was kept
    (Euclidean distance, ``scipy.ndimage.distance_transform_edt`` indices), not blindly
    ``background``: a fragment of one class inside an object of another class would
    otherwise become a hole of background in that object.  A fragment floating in the
    background becomes background, and one wedged between two classes is split between
    them along the middle.  Ties go to one of the equally near voxels.

    **Cost.** One labelling pass per class value (time O(classes × voxels), one int32
    array), then one distance transform over the bounding box of the removed voxels
    (``ndim`` index arrays of that box): about 20 bytes per voxel at the peak; 1.6 s and
    75 MiB for a three-class prediction of 60×256×256 voxels on one CPU core.
    """
    array = _labels_arg(labels, "labels")
    min_size = _int_arg(min_size, "min_size", minimum=0)
    largest = set(_int_values(keep_largest, "keep_largest"))
    background = _int_arg(background, "background")
    if background in largest:
        raise ValueError(f"keep_largest must not name the background value {background}, got {sorted(largest)}")
    structure = _connectivity_arg(connectivity, array.ndim)
    sampling = _spacing_arg(spacing, array.ndim)

    out = array.copy()
    if min_size <= 1 and not largest:
        return out
    removed = np.zeros(array.shape, bool)
    for value in np.unique(array).tolist():
        if value == background:
            continue
        components, n = ndimage.label(array == value, structure=structure)
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        drop = sizes < min_size
        if value in largest and n > 1:
            others = np.ones(n + 1, bool)
            others[1 + int(np.argmax(sizes[1:]))] = False
            drop |= others  # the largest stays unless it is under min_size too
        drop[0] = False  # not this class
        if drop.any():
            removed |= drop[components]
    if removed.any():
        _nearest_kept(out, removed, background, sampling)
    return out


# -- instances --------------------------------------------------------------------------------
def _class_prediction(
    data: Any, class_values: Sequence[int] | None, needed: dict[str, int | None]
) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """``(labels, probabilities or None, channel of the boundary class or None)`` from either kind of input."""
    array = np.asarray(data)
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim not in (3, 4):
            raise ValueError(
                "labels_or_probabilities: class probabilities must be (K, Y, X) or (K, Z, Y, X), "
                f"got {array.ndim}D with shape {array.shape}"
            )
        k = array.shape[0]
        values = tuple(range(k)) if class_values is None else _int_values(class_values, "class_values")
        if len(values) != k or len(set(values)) != k:
            raise ValueError(f"class_values must be {k} distinct values (one per channel), got {class_values!r}")
        for name, value in needed.items():
            if value is not None and value not in values:
                raise ValueError(f"{name} {value} is not one of the class values {list(values)}")
        labels = np.asarray(values)[np.argmax(array, axis=0)]
        boundary = needed["boundary"]
        return labels, array, (None if boundary is None else values.index(boundary))
    if class_values is not None:
        raise ValueError("class_values is for class probabilities (a float array); labels_or_probabilities holds labels")
    return _labels_arg(array, "labels_or_probabilities"), None, None


def instances_from_prediction(
    labels_or_probabilities: Any,
    *,
    interior: int = 1,
    boundary: int | None = None,
    foreground: Iterable[int] | None = None,
    class_values: Sequence[int] | None = None,
    min_size: int = 0,
    min_seed_size: int = 0,
    seed_erosion: int = 0,
    min_distance: int = 10,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Split a class prediction into object instances by a seeded watershed.

    Parameters
    ----------
    labels_or_probabilities : array
        Either class labels (integer, (Z, Y, X) or (Y, X), the user's label values) or class
        probabilities (float, (K, Z, Y, X) or (K, Y, X)) whose channels are ``class_values``.
        Not modified.
    interior : int
        The class value of object interiors: its connected components are the seeds.
    boundary : int, optional
        The class value of object boundaries (the voxels that separate touching objects).
        Without one, objects are split at the peaks of their distance transform (see Notes).
    foreground : iterable of int, optional
        The class values flooded from the seeds; default ``interior`` and ``boundary``.
        ``interior`` is always included.
    class_values : sequence of int, optional
        The label value of each probability channel (``RunResult.class_values``); default
        ``0 .. K-1``.  Only for probabilities.
    min_size : int
        Instances with fewer voxels are dropped (they become 0).
    min_seed_size : int
        Interior components with fewer voxels are not seeds (their voxels are flooded from a
        neighbouring seed, or form an unseeded object, below).
    seed_erosion : int
        Erode the interior by this many voxels before taking its components: splits seeds
        joined by a thin bridge of wrongly predicted interior.
    min_distance : int
        Without ``boundary``: the least distance, in voxels, between two seeds (peaks);
        about the radius of the smallest object (smaller: more splits).
    spacing : sequence of float, optional
        Voxel size per axis; distance transforms use it (default isotropic).
    connectivity : int
        1 faces, up to the number of dimensions (corners): which voxels are neighbours, for
        components and for the flooding.

    Returns
    -------
    ndarray of uint32
        Instance ids 1..N, numbered consecutively; 0 is background.

    Notes
    -----
    **Three classes (boundary given).**  Seeds: the connected components of ``interior``
    (after ``seed_erosion`` and ``min_seed_size``).  Flooded: the voxels of ``foreground``.
    Landscape: the boundary class's probability when probabilities are given (the flood
    stops where the network sees a boundary), otherwise the distance to the nearest seed
    (``distance_transform_edt(..., sampling=spacing)``), which gives each boundary voxel
    to the nearest object.  With probabilities, the classes are their argmax.

    **Two classes (no boundary).**  Seeds: the maxima of the distance transform of the
    foreground (``skimage.feature.peak_local_max``, at least ``min_distance`` voxels apart,
    at least one per connected component), landscape its negative.  Useful for roundish
    objects; elongated ones may be split at several maxima (raise ``min_distance``).

    A connected component of the foreground that holds no seed becomes an instance of
    its own, so no predicted object is lost for want of a seed.

    **Cost.**  Labelling and distance transforms are O(voxels); the watershed is
    O(voxels · log voxels).  Memory: about 50 bytes per voxel at the peak (float64
    landscape, int32 markers, the watershed's own copies, queue and output), beyond the
    input.  Measured on the nuclei volume (60×256×256, 3.9 M voxels, one CPU core):
    2.5 s and 206 MiB from labels, 2.4 s and 140 MiB from (3, ...) float32 probabilities.
    From the true three-class target it recovers the 20 true nuclei (instance F1 1.0 at
    IoU 0.5); the two-class fallback on the true nucleus masks gave F1 0.46 / 0.79 / 0.93
    with ``min_distance`` 5 / 10 / 15 (over-splitting at smaller distances).
    """
    interior = _int_arg(interior, "interior")
    if boundary is not None:
        boundary = _int_arg(boundary, "boundary")
        if boundary == interior:
            raise ValueError(f"boundary must differ from interior, both are {interior}")
    labels, probabilities, boundary_channel = _class_prediction(
        labels_or_probabilities, class_values, {"interior": interior, "boundary": boundary}
    )
    flooded = {interior} | ({boundary} if boundary is not None else set())
    if foreground is not None:
        flooded |= set(_int_values(foreground, "foreground"))
    min_size = _int_arg(min_size, "min_size", minimum=0)
    min_seed_size = _int_arg(min_seed_size, "min_seed_size", minimum=0)
    seed_erosion = _int_arg(seed_erosion, "seed_erosion", minimum=0)
    min_distance = _int_arg(min_distance, "min_distance", minimum=1)
    sampling = _spacing_arg(spacing, labels.ndim)
    structure = _connectivity_arg(connectivity, labels.ndim)

    from skimage.segmentation import watershed

    mask = np.isin(labels, sorted(flooded))
    if boundary is not None:
        seeds = labels == interior
        if seed_erosion:
            seeds = ndimage.binary_erosion(seeds, structure=structure, iterations=seed_erosion)
        markers, n = ndimage.label(seeds, structure=structure)
        if min_seed_size > 1 and n:
            small = np.bincount(markers.ravel(), minlength=n + 1) < min_seed_size
            small[0] = True
            markers[small[markers]] = 0
        if probabilities is not None:
            landscape = probabilities[boundary_channel]
        else:
            landscape = ndimage.distance_transform_edt(markers == 0, sampling=sampling)
    else:
        markers, landscape = _distance_seeds(mask, structure, min_distance, sampling)
    instances = watershed(landscape, markers, mask=mask, connectivity=structure)
    # foreground that no seed reached: objects of their own
    unseeded, extra = ndimage.label(mask & (instances == 0), structure=structure)
    if extra:
        top = int(instances.max())
        instances[unseeded > 0] = unseeded[unseeded > 0] + top
    return _renumber(instances, min_size)


def _distance_seeds(
    mask: np.ndarray, structure: np.ndarray, min_distance: int, sampling: tuple[float, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Markers at the maxima of the foreground's distance transform, and the landscape (its negative)."""
    from skimage.feature import peak_local_max

    distance = ndimage.distance_transform_edt(mask, sampling=sampling)
    components, _ = ndimage.label(mask, structure=structure)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    marked = np.zeros(mask.shape, bool)
    marked[tuple(peaks.T)] = True
    # peaks on one plateau that touch are one seed
    markers, _ = ndimage.label(marked, structure=np.ones((3,) * mask.ndim, bool))
    return markers, -distance


def _renumber(instances: np.ndarray, min_size: int) -> np.ndarray:
    """Drop instances under ``min_size`` voxels; ids 1..N in order of the old ids; uint32."""
    sizes = np.bincount(instances.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    new_ids = np.zeros(sizes.size, np.uint32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return new_ids[instances]
