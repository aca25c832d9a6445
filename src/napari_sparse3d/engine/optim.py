"""The optimiser side of a training run: AdamW, its schedule, its restored state, and the back-off policy.

Kept apart from :mod:`napari_sparse3d.engine.training` so that the trainer
reads as the loop it is.  :class:`BackOff` is the policy for steps whose loss
or gradient is not finite (they are skipped, see ``Trainer._step``): after a
few in a row the learning rate is halved, after a few more the rest of the
round trains in float32, and after that training stops with a clear error.
In float16 an overflow is skipped by the loss scaler, which halves its scale
and tries again; those skips count only once the scale is below 1.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from napari_sparse3d.config import TrainConfig

__all__ = ["BackOff", "halve_batch", "learning_rate", "make_optimizer", "restore_optimizer"]


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)


def restore_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, state: Any, tc: TrainConfig) -> torch.optim.Optimizer:
    """Continue AdamW's moments from a checkpoint; a state that does not fit the network gives a fresh optimiser."""
    params = list(model.parameters())
    try:
        saved = state["state"]
        for index, entry in saved.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(entry[key].shape) != tuple(params[int(index)].shape):
                    raise ValueError(f"state {index}.{key} has shape {tuple(entry[key].shape)}")
        optimizer.load_state_dict(state)
        return optimizer
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        warnings.warn(
            f"init: the checkpoint's optimiser state does not fit this network ({exc}); AdamW starts afresh",
            RuntimeWarning,
            stacklevel=4,
        )
        return make_optimizer(model, tc)


def halve_batch(batch_size: int, device_type: str, patch_size: tuple[int, ...], exc: BaseException) -> int:
    """The batch to retry with after running out of memory (and a warning); an error at one patch."""
    if batch_size <= 1:
        raise MemoryError(
            f"out of {device_type} memory even with one patch of {tuple(patch_size)} voxels; choose a"
            " smaller config.train.patch_voxels or the 'default' preset"
        ) from exc
    message = f"out of {device_type} memory: training goes on with batch size {batch_size // 2}"
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    return batch_size // 2


def learning_rate(tc: TrainConfig, step_in_round: int, progress: float) -> float:
    """Linear warm-up, then polynomial decay over the round's budget (``progress`` 0..1)."""
    lr = tc.learning_rate
    if tc.warmup_steps and step_in_round < tc.warmup_steps:
        lr *= (step_in_round + 1) / tc.warmup_steps
    if tc.lr_schedule == "poly":
        lr *= (1.0 - min(progress, 0.999)) ** 0.9
    return lr


class BackOff:
    """What to do after ``consecutive`` skipped steps in a row (see the module docstring)."""

    #: Consecutive skipped steps after which the learning rate is halved, after which
    #: the rest of the round runs in float32, and after which training gives up.
    LOWER_LR, FLOAT32, GIVE_UP = 3, 6, 10

    @classmethod
    def react(cls, consecutive: int, where: str, *, float32_already: bool, advice: str) -> str | None:
        """``"halve_lr"``, ``"float32"`` or None; raises ``FloatingPointError`` when it is time to give up."""
        if consecutive == cls.LOWER_LR:
            warnings.warn(
                f"{consecutive} training steps in a row had a non-finite loss or gradient ({where});"
                f" the learning rate is halved for the rest of this round",
                RuntimeWarning,
                stacklevel=5,
            )
            return "halve_lr"
        if consecutive == cls.FLOAT32 and not float32_already:
            warnings.warn(
                f"{consecutive} training steps in a row had a non-finite loss or gradient ({where}), also at a lower"
                " learning rate; the rest of this round trains in float32",
                RuntimeWarning,
                stacklevel=5,
            )
            return "float32"
        if consecutive >= cls.GIVE_UP:
            raise FloatingPointError(
                f"training stopped at {where}: {consecutive} steps in a row had a non-finite loss or gradient,"
                f" also at half the learning rate and in float32, so none of them changed the weights (the model"
                f" keeps those of its last good step). {advice}"
            )
        return None
