"""Joint augmentation of an image patch, its targets and its weights.

Spatial transforms (flips, in-plane 90 degree rotations) are applied to the
three arrays alike; intensity transforms (contrast, brightness, gamma,
noise) to the image only.  All randomness comes from the caller's
``numpy.random.Generator``, so a seeded run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Augmenter"]


@dataclass(frozen=True)
class Augmenter:
    """Random transforms for one training sample.

    Parameters
    ----------
    flip : bool
        Mirror each spatial axis with probability 1/2.
    rotate90 : bool
        Rotate the (y, x) plane by a random multiple of 90 degrees; only
        applied when the patch is square in y and x and the voxels are too
        (``square_yx``), so that geometry is preserved.
    intensity : bool
        Contrast and brightness changes on every sample, gamma and Gaussian
        noise on some (the image is z-scored, so these act in units of its
        standard deviation).
    intensity_channels : int, optional
        Only the first so many channels get the intensity changes (the rest are
        the pixel classifier's probabilities, which stay as they are); default all.
    """

    flip: bool = True
    rotate90: bool = True
    intensity: bool = True
    square_yx: bool = True
    intensity_channels: int | None = None

    def __call__(
        self, image: np.ndarray, target: np.ndarray, weight: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``image`` (C, z, y, x); ``target`` and ``weight`` (z, y, x)."""
        if self.flip:
            for axis in range(3):
                if rng.random() < 0.5:
                    image = np.flip(image, axis + 1)
                    target = np.flip(target, axis)
                    weight = np.flip(weight, axis)
        if self.rotate90 and self.square_yx and image.shape[-1] == image.shape[-2]:
            k = int(rng.integers(4))
            if k:
                image = np.rot90(image, k, axes=(2, 3))
                target = np.rot90(target, k, axes=(1, 2))
                weight = np.rot90(weight, k, axes=(1, 2))
        image = np.ascontiguousarray(image, dtype=np.float32)
        if self.intensity:
            image = self._intensity(image, rng, self.intensity_channels)
        return image, np.ascontiguousarray(target), np.ascontiguousarray(weight)

    @staticmethod
    def _intensity(image: np.ndarray, rng: np.random.Generator, channels: int | None = None) -> np.ndarray:
        for c in range(image.shape[0] if channels is None else min(channels, image.shape[0])):
            ch = image[c]
            if rng.random() < 0.3:  # gamma on the patch's own range
                lo, hi = float(ch.min()), float(ch.max())
                if hi > lo:
                    gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.5))))
                    ch[...] = ((ch - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
            ch *= rng.uniform(0.75, 1.25)
            ch += rng.uniform(-0.25, 0.25)
            if rng.random() < 0.15:
                ch += rng.normal(0.0, rng.uniform(0.0, 0.1), size=ch.shape).astype(np.float32)
        return image
