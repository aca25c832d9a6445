"""Baseline for the label-efficiency benchmark: an ilastik-style pixel classifier.

A random forest classifies every voxel from a stack of generic, hand-made
filter responses (smoothed intensity, gradient magnitude and Hessian
eigenvalues at several Gaussian scales), trained on the voxels of the
annotated slices only.  This is what ilastik's "Pixel Classification" does
with its default feature set, and it is the natural thing a user would try
before training a network.

Usage::

    stack = features(image)                                 # (Z, Y, X, F) float32, once per image
    prediction = fit_predict(stack, sparse_labels, annotated_mask)

``features`` does not depend on the labels (about 15 s and 1.6 GB for
60x256x256 on two cores), so compute it once and reuse it for every annotation
setting; ``fit_predict`` takes about half a minute there with ~5% of the voxels
annotated.

Needs scikit-image and scikit-learn (``pip install napari-sparse3d[benchmark]``).
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["FOREST_DEFAULTS", "features", "fit_predict", "rescale"]

#: Parameters of the forest used by the benchmark (recorded with each result).
FOREST_DEFAULTS = {
    "n_estimators": 100,
    "max_depth": 20,
    "min_samples_leaf": 1,
    "max_features": "sqrt",
    "random_state": 0,
}


def rescale(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the ``low`` .. ``high`` percentiles of ``image`` to 0 .. 1 (float32, clipped)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return np.zeros_like(image)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def features(
    image: np.ndarray, *, sigma_min: float = 1, sigma_max: float = 16, num_sigma: int | None = None
) -> np.ndarray:
    """Multiscale intensity, edge and texture features of a 3D image.

    The image is first rescaled to [0, 1] by percentiles (see :func:`rescale`).

    Returns
    -------
    ndarray, shape ``image.shape + (n_features,)``, float32
    """
    from skimage.feature import multiscale_basic_features

    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {image.shape}")
    stack = multiscale_basic_features(
        rescale(image),
        intensity=True,
        edges=True,
        texture=True,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        num_sigma=num_sigma,
    )
    return np.asarray(stack, dtype=np.float32)


def fit_predict(
    stack: np.ndarray,
    sparse_labels: np.ndarray,
    annotated_mask: np.ndarray,
    *,
    n_jobs: int = -1,
    chunk_voxels: int = 1 << 19,
    timings: dict | None = None,
    **forest_params,
) -> np.ndarray:
    """Train a random forest on the annotated voxels and label every voxel.

    Parameters
    ----------
    stack : ndarray, shape ``(Z, Y, X, F)``
        Output of :func:`features`.
    sparse_labels : ndarray of int, shape ``(Z, Y, X)``
        Class value of each annotated voxel (0 is an ordinary class, usually
        background); values outside ``annotated_mask`` are ignored.
    annotated_mask : ndarray of bool, shape ``(Z, Y, X)``
        True where a voxel was annotated.
    n_jobs : int
        Passed to scikit-learn (-1: all cores).
    chunk_voxels : int
        Voxels per prediction call, to bound memory.
    timings : dict, optional
        If given, receives ``"fit"`` and ``"predict"`` wall times in seconds.
    **forest_params
        Override :data:`FOREST_DEFAULTS` (``n_estimators``, ``max_depth``, ...).

    Returns
    -------
    ndarray, shape ``(Z, Y, X)``, dtype of ``sparse_labels``
        The predicted class value of every voxel.
    """
    from sklearn.ensemble import RandomForestClassifier

    stack = np.asarray(stack)
    sparse_labels = np.asarray(sparse_labels)
    annotated_mask = np.asarray(annotated_mask, dtype=bool)
    shape = sparse_labels.shape
    if stack.ndim != 4 or stack.shape[:3] != shape:
        raise ValueError(f"stack must have shape {shape} + (n_features,), got {stack.shape}")
    if annotated_mask.shape != shape:
        raise ValueError(f"annotated_mask must have shape {shape}, got {annotated_mask.shape}")
    if not annotated_mask.any():
        raise ValueError("annotated_mask selects no voxel to train on")

    t0 = time.perf_counter()
    x_train = stack[annotated_mask]
    y_train = sparse_labels[annotated_mask]
    params = {**FOREST_DEFAULTS, **forest_params}
    forest = RandomForestClassifier(n_jobs=n_jobs, **params)
    forest.fit(x_train, y_train)
    del x_train, y_train
    t1 = time.perf_counter()

    flat = stack.reshape(-1, stack.shape[-1])
    prediction = np.empty(flat.shape[0], dtype=sparse_labels.dtype)
    for start in range(0, flat.shape[0], chunk_voxels):
        stop = start + chunk_voxels
        prediction[start:stop] = forest.predict(flat[start:stop])
    if timings is not None:
        timings["fit"] = t1 - t0
        timings["predict"] = time.perf_counter() - t1
    return prediction.reshape(shape)
