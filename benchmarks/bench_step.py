"""Where a training step's time goes on this machine, and what the normalisation kernel and layout cost.

A :class:`~napari_sparse3d.engine.training.Trainer` is set up as ``run`` sets it
up (default configuration, three-class nuclei, 2 annotated slices per axis),
then two measurements:

1. **Breakdown** of the default step, phase by phase (drawing the batch on the
   host, copying it in, the spatial augmentation, forward, loss, backward,
   clipping, the optimiser), median milliseconds over ``--steps`` steps.
2. **Variants** of the network on one fixed batch: instance normalisation by
   ``torch.nn.functional.instance_norm`` (what ``nn.InstanceNorm3d`` runs) or by
   ``group_norm`` with one channel per group (the package's ``InstanceNorm3d``;
   the same function), each in the contiguous and the ``channels_last_3d``
   layout; the median seconds of forward + backward + AdamW, and the loss after
   the same steps (the variants compute the same function, so it must agree).

Also the set-up time (the pixel classifier's features, fit and probability map).

    python benchmarks/bench_step.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import label_efficiency as le
from napari_sparse3d.engine.devices import autocast
from napari_sparse3d.engine.model import InstanceNorm3d
from napari_sparse3d.engine.training import Trainer


class KernelInstanceNorm(nn.InstanceNorm3d):
    """The same parameters, run by ``instance_norm`` (what torch's own module does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


def with_kernel_norm(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, InstanceNorm3d):
                replacement = KernelInstanceNorm(child.num_features, affine=True, eps=child.eps)
                replacement.load_state_dict(child.state_dict())
                setattr(module, name, replacement)
    return model


def breakdown(trainer: Trainer, steps: int) -> dict[str, float]:
    phases: dict[str, list[float]] = {k: [] for k in ("sample", "to tensor", "spatial", "forward", "loss", "backward",
                                                      "clip", "optimizer")}
    tc = trainer.config.train
    trainer.model.train()
    for _ in range(steps + 5):
        marks = [time.perf_counter()]
        image, target, weight = trainer.sampler.sample(trainer.batch_size, trainer.rng)
        marks.append(time.perf_counter())
        x, t, w = (torch.from_numpy(a).to(trainer.device) for a in (image, target, weight))
        marks.append(time.perf_counter())
        if trainer.spatial.enabled:
            x, t, w = trainer.spatial(x, t, w, trainer.torch_rng)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        marks.append(time.perf_counter())
        with autocast(trainer.device, trainer.precision):
            outputs = trainer.model(x)
        marks.append(time.perf_counter())
        loss = trainer.loss_fn(outputs, t, w)
        float(loss.detach())
        marks.append(time.perf_counter())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), tc.grad_clip)
        marks.append(time.perf_counter())
        trainer.optimizer.step()
        marks.append(time.perf_counter())
        for key, a, b in zip(phases, marks[:-1], marks[1:]):
            phases[key].append(b - a)
    return {k: float(np.median(v[5:])) for k, v in phases.items()}


def variant(trainer: Trainer, model: nn.Module, channels_last: bool, steps: int) -> tuple[float, float]:
    model = copy.deepcopy(model).to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image, target, weight = trainer.sampler.sample(trainer.batch_size, np.random.default_rng(0))
    x, t, w = (torch.from_numpy(a) for a in (image, target, weight))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    model.train()
    times = []
    for _ in range(steps + 5):
        start = time.perf_counter()
        loss = trainer.loss_fn(model(x), t, w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[5:])), float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    image, instances, source = le.load_data()
    truth = le.make_truth(instances, "three-class")
    slices, _, sparse = le.annotation(truth, 2)
    start = time.perf_counter()
    trainer = Trainer.from_inputs(image, sparse, slices, spacing=le.SPACING, seed=0)
    setup = time.perf_counter() - start
    print(f"nuclei ({source}), three-class, 2 slices per axis; torch {torch.__version__}, {torch.get_num_threads()} threads,"
          f" precision {trainer.precision}, patch {trainer.patch_size}, batch {trainer.batch_size}")
    print(f"set-up (planning, pixel classifier: features, fit, probability map): {setup:.1f} s")
    phases = breakdown(trainer, args.steps)
    total = sum(phases.values())
    print(f"\ndefault step, median over {args.steps} steps: {1000 * total:.0f} ms")
    for key, value in phases.items():
        print(f"  {key:10s} {1000 * value:7.1f} ms  {100 * value / total:5.1f}%")
    print(f"\nnetwork variants (one fixed batch; forward + loss + backward + AdamW; {args.repeats} interleaved repeats):")
    print("| normalisation kernel | layout | ms per step (median of repeats) | repeats | loss after the same steps |")
    print("|---|---|---|---|---|")
    models = {"group_norm (package)": trainer.model, "instance_norm (torch)": with_kernel_norm(trainer.model)}
    cases = [(name, channels_last) for channels_last in (True, False) for name in models]
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {case: [] for case in cases}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine does not favour one variant
        for name, channels_last in cases:
            results[name, channels_last].append(variant(trainer, models[name], channels_last, args.steps))
    for (name, channels_last), runs in results.items():
        layout = "channels_last_3d" if channels_last else "contiguous"
        ms = [1000 * s for s, _ in runs]
        print(f"| {name} | {layout} | {np.median(ms):.0f} | {' '.join(f'{m:.0f}' for m in ms)} | {runs[-1][1]:.5f} |")

if __name__ == "__main__":
    main()
