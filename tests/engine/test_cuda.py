"""The CUDA paths on a real GPU: mixed precision, loss scaling, prediction, out-of-memory retry, memory release.

Marked ``cuda`` and skipped where torch sees no CUDA device (CI has none):
``pytest -m cuda`` on a GPU machine runs them.
"""

import copy
import dataclasses
import gc
import threading
import warnings

import numpy as np
import pytest
import torch

from napari_sparse3d.engine.prediction import predict_blocks
from napari_sparse3d.engine.training import Trainer, TrainReport
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.loop.jobs import training_job

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _finite(model):
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def _trainer(small_volume, config, device="cuda", **kwargs):
    image, labels, _, slices = small_volume
    return Trainer.from_inputs(image, labels, slices, config=config, device=device, **kwargs)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_training_steps_keep_the_weights_finite(small_volume, tiny_config, precision, dtype):
    trainer = _trainer(small_volume, tiny_config.replace(train={"precision": precision}))
    assert trainer.precision == dtype and trainer.scaler.is_enabled() == (dtype == torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no back-off
        reports = list(trainer.steps(max_iterations=30))
    assert [r.iteration for r in reports] == list(range(1, 31)) and all(np.isfinite(r.loss) for r in reports)
    if dtype == torch.bfloat16:
        assert reports[-1].skipped == 0  # float16 may skip a few steps while its loss scale settles
    assert next(trainer.model.parameters()).device.type == "cuda" and _finite(trainer.model)
    assert reports[-1].loss < reports[0].loss  # it learns


def test_float16_loss_scaling_skips_an_overflowing_step_and_lowers_the_scale(small_volume, tiny_config):
    trainer = _trainer(small_volume, tiny_config.replace(train={"precision": "fp16"}))
    steps = trainer.steps(max_iterations=3)
    first = next(steps)
    scale = trainer.scaler.get_scale()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_loss, real_step, attempts, seen = trainer.loss_fn, trainer.optimizer.step, [0], []

    def loss_fn(*args):
        attempts[0] += 1
        loss = real_loss(*args)
        return loss * 2.0**100 if attempts[0] == 1 else loss  # finite, but its float16 gradients overflow

    def step(*args, **kwargs):  # the update after the overflow starts from the weights before it
        seen.append(all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items()))
        return real_step(*args, **kwargs)

    trainer.loss_fn, trainer.optimizer.step = loss_fn, step
    second = next(steps)
    # (an early float16 step may also overflow by itself: then the scale drops once more)
    assert attempts[0] >= 2 and seen == [True] and second.iteration == first.iteration + 1
    assert second.skipped == first.skipped + attempts[0] - 1
    assert trainer.scaler.get_scale() == scale * trainer.scaler.get_backoff_factor() ** (attempts[0] - 1)
    assert _finite(trainer.model)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_prediction_on_the_gpu_matches_the_cpu(small_volume, tiny_config, precision):
    image, labels, truth, slices = small_volume
    config = tiny_config.replace(train={"precision": "fp32"})
    trainer = _trainer(small_volume, config, device="cpu")
    list(trainer.steps(max_iterations=40))
    model = trainer.snapshot()
    model.sparse3d = dataclasses.replace(
        model.sparse3d, config=model.sparse3d.config.replace(train={"precision": precision})
    )
    volume = as_volume(image)

    def probabilities(device):
        out = np.zeros((model.num_classes,) + image.shape, np.float32)
        for block in predict_blocks(volume, copy.deepcopy(model), device=device):
            out[(slice(None),) + tuple(block.region)] = block.probabilities
        return out

    cpu, gpu = probabilities("cpu"), probabilities("cuda")
    ordered = np.sort(cpu, axis=0)
    margin = ordered[-1] - ordered[-2]
    # float32 on the GPU may use TF32 convolutions; "auto" is bfloat16 there: tolerate near-ties only
    sure = margin > (0.02 if precision == "fp32" else 0.1)
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(cpu.argmax(0)[sure], gpu.argmax(0)[sure])
    assert (cpu.argmax(0) == gpu.argmax(0)).mean() >= (0.999 if precision == "fp32" else 0.99)
    assert np.abs(cpu - gpu).max() < (0.05 if precision == "fp32" else 0.2)


def test_a_real_out_of_memory_halves_the_batch(tiny_config):
    from napari_sparse3d.sample_data import evenly_spaced_slices, make_cells, sparse_annotations

    image, truth = make_cells((32, 96, 96), classes=2, seed=0)
    slices = evenly_spaced_slices(image.shape, 2)
    config = tiny_config.replace(
        model={"levels": 3, "base_features": 16}, train={"patch_size": [32, 64, 64], "batch_size": 8, "prefetch": False}
    )
    trainer = Trainer.from_inputs(image, sparse_annotations(truth, slices), slices, config=config, device="cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        trainer.batch_size = 1  # measure one patch's memory
        list(trainer.steps(max_iterations=2))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        list(trainer.steps(max_iterations=1))
        per_patch = torch.cuda.max_memory_allocated() - base
        assert per_patch > 16 * 2**20, per_patch  # large enough for the allocator's rounding not to matter
        # room for about three patches: 8 and 4 do not fit, 2 (or 1) does
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 3 * per_patch) / total)
        trainer.batch_size = 8
        with pytest.warns(RuntimeWarning, match="out of cuda memory: training goes on with batch size 4"):
            reports = list(trainer.steps(max_iterations=3))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert len(reports) == 3 and 1 <= trainer.batch_size <= 2 and _finite(trainer.model)


def test_memory_returns_to_its_baseline_after_each_stop(small_volume, tiny_config):
    def cycle(seed):
        trainer = _trainer(small_volume, tiny_config, seed=seed)
        stop = threading.Event()
        for item in training_job(trainer, stop=stop, preview_every=0.1):
            if isinstance(item, TrainReport) and item.iteration >= 5:
                stop.set()
        # after Stop the job has predicted and released the allocator's cache: what is reserved is in use
        torch.cuda.synchronize()
        assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 64 * 2**20
        del trainer, item
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    baseline = cycle(0)  # the first cycle also creates cuBLAS/cuDNN workspaces, kept for the process
    for seed in (1, 2, 3):
        assert abs(cycle(seed) - baseline) < 2**20, f"cycle {seed}: {cycle(seed) - baseline} bytes above the baseline"
