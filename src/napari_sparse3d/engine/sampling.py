"""Training patches drawn around the annotations.

Every patch contains annotated voxels (it is placed around one), and a
``foreground_fraction`` share of them (a third by default, nnU-Net's rule)
around a voxel of a foreground class picked uniformly among the classes, so
that rare classes such as thin boundaries are seen often.  A :class:`Prefetcher`
draws the next batches in a background thread while the network trains.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

import numpy as np

from napari_sparse3d.engine.augment import Augmenter
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.volume import Volume

__all__ = ["MultiSampler", "PatchSampler", "Prefetcher", "class_weights"]


def class_weights(counts: np.ndarray, mode: str) -> np.ndarray:
    """Per-class loss weights from annotated voxel counts, normalised to a mean of 1 over labeled voxels.

    ``"sqrt"`` weighs a class by 1/sqrt(frequency), ``"inverse"`` by
    1/frequency, ``"none"`` equally.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.ones_like(counts)
    if mode == "sqrt":
        weights[present] = 1.0 / np.sqrt(counts[present])
    elif mode == "inverse":
        weights[present] = 1.0 / counts[present]
    mean = (weights * counts).sum() / max(counts.sum(), 1.0)
    return (weights / mean).astype(np.float32)


class PatchSampler:
    """Draws augmented training batches from a volume and its sparse targets.

    Parameters
    ----------
    volume : Volume
        The image; patches are read from it and normalised on the fly.
    normalization : Normalization
    target : (Z, Y, X) int array
        Class index per voxel, -1 where unlabeled.
    weights : (K,) float array
        Loss weight of each class.
    patch_size : (z, y, x)
        May exceed the volume; the patch is then padded (weight 0 there).
    foreground_classes : sequence of int
        Class indices that count as foreground for the forced share.
    """

    def __init__(
        self,
        volume: Volume,
        normalization: Normalization,
        target: np.ndarray,
        weights: np.ndarray,
        patch_size: Sequence[int],
        foreground_classes: Sequence[int],
        *,
        foreground_fraction: float = 1 / 3,
        augmenter: Augmenter | None = None,
        max_positions: int = 2_000_000,
    ) -> None:
        self.volume = volume
        self.normalization = normalization
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_fraction = foreground_fraction
        self.augmenter = augmenter or Augmenter()
        self.max_positions = max_positions
        self.foreground_classes = list(foreground_classes)
        self.set_targets(target, weights)

    def set_targets(self, target: np.ndarray, weights: np.ndarray) -> None:
        """Replace the annotations (for example after the user painted corrections).

        The new state is built aside and swapped in with one assignment, so a
        prefetching thread inside :meth:`sample` sees either the old or the new
        annotations, never a mix.
        """
        weights = np.asarray(weights, dtype=np.float32)
        flat = target.ravel()
        labeled = np.flatnonzero(flat >= 0)
        sampler = np.random.default_rng(0)  # fixed: which positions are kept must not consume the training rng
        if labeled.size > self.max_positions:
            labeled = sampler.choice(labeled, self.max_positions, replace=False)
        by_class = {}
        for k in self.foreground_classes:
            positions = labeled[flat[labeled] == k]
            if positions.size:
                by_class[k] = positions
        self._state = (target, weights, labeled, by_class)

    @property
    def target(self) -> np.ndarray:
        return self._state[0]

    def _origin(self, flat_index: int, rng: np.random.Generator) -> tuple[int, ...]:
        shape = self.target.shape
        centre = np.unravel_index(int(flat_index), shape)
        origin = []
        for c, p, d in zip(centre, self.patch_size, shape):
            start = int(c) - int(rng.integers(p))  # the chosen voxel lands anywhere in the patch
            origin.append(int(np.clip(start, 0, max(d - p, 0))))
        return tuple(origin)

    def _read(self, origin: Sequence[int], state: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        all_targets, class_weight = state[0], state[1]
        region = tuple(slice(o, o + p) for o, p in zip(origin, self.patch_size))
        image = self.normalization.apply(self.volume.read(region))
        target = np.asarray(all_targets[region], dtype=np.int64)
        weight = np.where(target >= 0, class_weight[np.clip(target, 0, None)], 0.0).astype(np.float32)
        pad = [(0, p - s) for p, s in zip(self.patch_size, target.shape)]
        if any(after for _, after in pad):
            image = np.pad(image, [(0, 0)] + pad)
            target = np.pad(target, pad, constant_values=-1)
            weight = np.pad(weight, pad)
        return image, target, weight

    def draw(self, rng: np.random.Generator, state: tuple | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One augmented sample ``(image (C, z, y, x), target (z, y, x), weight (z, y, x))``."""
        state = self._state if state is None else state
        labeled, by_class = state[2], state[3]
        present = list(by_class)
        if present and rng.random() < self.foreground_fraction:
            positions = by_class[present[int(rng.integers(len(present)))]]
        else:
            positions = labeled
        origin = self._origin(positions[int(rng.integers(positions.size))], rng)
        return self.augmenter(*self._read(origin, state), rng)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch ``(image (B, C, z, y, x), target (B, z, y, x), weight (B, z, y, x))``."""
        state = self._state  # one snapshot for the whole batch
        return _stack([self.draw(rng, state) for _ in range(batch_size)])


def _stack(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, targets, weights = zip(*samples)
    return np.stack(images), np.stack(targets), np.stack(weights)


class MultiSampler:
    """Batches drawn across several volumes, each with its own :class:`PatchSampler`.

    Each patch comes from a volume chosen uniformly at random (nnU-Net draws
    training cases the same way): a sparsely annotated volume is seen as
    often as a densely annotated one, so no volume's appearance is drowned
    by another's.  ``drawn[i]`` counts the patches taken from volume ``i``.
    """

    def __init__(self, samplers: Sequence[PatchSampler]) -> None:
        if not samplers:
            raise ValueError("MultiSampler needs at least one PatchSampler")
        self.samplers = list(samplers)
        self.drawn = [0] * len(self.samplers)

    def set_targets(self, target: np.ndarray, weights: np.ndarray, index: int = 0) -> None:
        """Replace the annotations of volume ``index`` (see :meth:`PatchSampler.set_targets`)."""
        self.samplers[index].set_targets(target, weights)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch as :meth:`PatchSampler.sample` gives, its patches drawn across the volumes."""
        if len(self.samplers) == 1:  # the same random stream as a single sampler: seeded runs do not change
            self.drawn[0] += batch_size
            return self.samplers[0].sample(batch_size, rng)
        samples = []
        for _ in range(batch_size):
            index = int(rng.integers(len(self.samplers)))
            self.drawn[index] += 1
            samples.append(self.samplers[index].draw(rng))
        return _stack(samples)


class Prefetcher:
    """Draws the next batches in a background thread while the network trains on the current one.

    Batches drawn before the annotations changed are discarded (each carries
    the generation of the targets it was drawn from).
    """

    def __init__(self, sampler: PatchSampler | MultiSampler, batch_size: int, rng: np.random.Generator, depth: int = 2) -> None:
        self.sampler, self.batch_size, self.rng = sampler, batch_size, rng
        self.queue: queue.Queue = queue.Queue(depth)
        self.generation = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._work, name="sparse3d-prefetch", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while not self.stopped.is_set():
            generation = self.generation
            try:
                item = (generation, self.sampler.sample(self.batch_size, self.rng), None)
            except Exception as exc:  # handed to the training thread, which raises it
                item = (generation, None, exc)
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def get(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        while True:
            try:
                generation, batch, error = self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the batch prefetching thread stopped unexpectedly") from None
                continue
            if error is not None:
                raise error
            if generation == self.generation:
                return batch

    def invalidate(self) -> None:
        self.generation += 1

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
