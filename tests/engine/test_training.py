"""Trainer: steps that cannot poison the model, back-off, and what a checkpoint carries on."""

import threading
import warnings

import numpy as np
import pytest
import torch

import napari_sparse3d
from napari_sparse3d.config import Config
from napari_sparse3d.engine.model import Conv3d
from napari_sparse3d.engine.trained import HISTORY_LIMIT, thin_history
from napari_sparse3d.engine.training import Trainer
from napari_sparse3d.io.checkpoint import load_checkpoint, save_checkpoint


class _PoisonGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: what oneDNN's bf16 bug produced."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _trainer(small_volume, config, **kwargs):
    image, labels, truth, slices = small_volume
    return Trainer.from_inputs(image, labels, slices, config=config, device="cpu", **kwargs)


def _poison(trainer, attempts):
    """Poison the gradients of the step attempts whose (1-based) numbers are in ``attempts``."""
    real = trainer.loss_fn
    count = [0]

    def loss_fn(*args):
        count[0] += 1
        loss = real(*args)
        return _PoisonGrad.apply(loss) if count[0] in attempts else loss

    trainer.loss_fn = loss_fn


def _optimizer_state(trainer):
    return {
        (i, k): v.clone() if isinstance(v, torch.Tensor) else v
        for i, s in trainer.optimizer.state_dict()["state"].items()
        for k, v in s.items()
    }


def _finite(model):
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def test_a_non_finite_gradient_step_is_skipped_and_reported(small_volume, tiny_config):
    trainer = _trainer(small_volume, tiny_config)
    steps = trainer.steps(max_iterations=4)
    first = next(steps)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = _optimizer_state(trainer)
    _poison(trainer, {1})
    # the poisoned attempt leaves no trace; the step after it is taken from the same weights and state
    real_step = trainer.optimizer.step
    seen = []

    def step(*a, **k):
        seen.append(
            all(torch.equal(v, weights[n]) for n, v in trainer.model.state_dict().items())
            and all(torch.equal(v, moments[key]) if isinstance(v, torch.Tensor) else v == moments[key]
                    for key, v in _optimizer_state(trainer).items())
        )
        return real_step(*a, **k)

    trainer.optimizer.step = step
    second = next(steps)
    assert seen == [True]  # optimizer.step ran once (for the good attempt), on untouched weights and moments
    assert (first.skipped, second.skipped) == (0, 1)
    assert second.iteration == first.iteration + 1 and trainer.skipped_steps == 1
    assert _finite(trainer.model)


def test_repeated_skips_halve_the_rate_then_fall_back_to_fp32_then_stop(small_volume, tiny_config):
    config = tiny_config.replace(train={"precision": "bf16", "lr_schedule": "constant"})
    trainer = _trainer(small_volume, config)
    steps = trainer.steps(max_iterations=50)
    next(steps)
    next(steps)
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _poison(trainer, set(range(1, 100)))  # every attempt after the second step
    with pytest.warns(RuntimeWarning) as caught:
        with pytest.raises(FloatingPointError, match=r"10 steps in a row had a non-finite loss or gradient"):
            next(steps)
    messages = [str(w.message) for w in caught]
    assert any("learning rate is halved" in m for m in messages)
    assert any("trains in float32" in m for m in messages)
    assert trainer._round_precision == torch.float32
    # the model is that of the last good step, and it can be saved and used
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, good[k]), k
    assert _finite(trainer.model)


def test_back_off_lasts_one_round_and_training_goes_on(small_volume, tiny_config):
    config = tiny_config.replace(train={"lr_schedule": "constant"})
    trainer = _trainer(small_volume, config)
    _poison(trainer, {2, 3, 4})
    with pytest.warns(RuntimeWarning, match="learning rate is halved"):
        reports = list(trainer.steps(max_iterations=4))
    assert [r.iteration for r in reports] == [1, 2, 3, 4]
    lr = config.train.learning_rate
    assert reports[0].learning_rate == pytest.approx(lr) and reports[-1].learning_rate == pytest.approx(lr / 2)
    assert reports[-1].skipped == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (report,) = list(trainer.steps(max_iterations=1))
    assert report.learning_rate == pytest.approx(lr) and report.skipped == 0


def test_float16_loss_scale_overflows_are_skipped_without_backing_off(small_volume, tiny_config):
    # float16 training starts its loss scale at 2**16 and halves it on each overflow: several skipped steps
    # in a row are normal there. A real GradScaler on the CPU runs the same scale logic as on CUDA.
    config = tiny_config.replace(train={"lr_schedule": "constant"})
    trainer = _trainer(small_volume, config)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    _poison(trainer, set(range(1, 9)))  # eight overflows in a row: more than the back-off's thresholds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (report,) = list(trainer.steps(max_iterations=1))
    assert report.skipped == 8 and trainer.scaler.get_scale() == 2.0**8 and _finite(trainer.model)
    assert report.learning_rate == pytest.approx(config.train.learning_rate)  # not halved
    # below a scale of 1 an overflow is a diverging run again: back-off, then a clear error
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    _poison(trainer, set(range(1, 100)))
    with pytest.warns(RuntimeWarning, match="learning rate is halved"):
        with pytest.raises(FloatingPointError, match="10 steps in a row"):
            list(trainer.steps(max_iterations=1))
    assert trainer.skipped_steps == 8 + 1 + 10  # one overflow (scale 2 -> 1) is rescaling, then ten count


def test_a_model_with_non_finite_weights_is_not_saved(small_volume, tiny_config, tmp_path):
    trainer = _trainer(small_volume, tiny_config)
    with torch.no_grad():
        next(iter(trainer.model.parameters()))[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_checkpoint(trainer.model, tmp_path / "broken.pt")
    assert not (tmp_path / "broken.pt").exists()


def test_bf16_convolution_smaller_than_its_kernel_has_exact_weight_gradients():
    """oneDNN's bf16 weight gradient is garbage for an input 2 voxels deep under a 3x3x3 kernel."""
    torch.manual_seed(0)
    conv = Conv3d(16, 16, 3, padding=1, bias=False).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 16, 2, 6, 6).contiguous(memory_format=torch.channels_last_3d)
    grads = []
    for _ in range(8):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().square().sum().backward()
        grads.append(conv.weight.grad.clone())
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(g, grads[0]) for g in grads)
    conv.zero_grad()
    conv(x).square().sum().backward()  # float32 reference
    torch.testing.assert_close(grads[0], conv.weight.grad)


# -- what a checkpoint carries on ------------------------------------------------------------------


def test_warm_start_with_another_spacing_keeps_the_planned_network(small_volume, tiny_config, tmp_path):
    image, labels, truth, slices = small_volume
    first = napari_sparse3d.run(
        image, labels, annotated_slices=slices, spacing=(1.0, 1.0, 1.0), max_iterations=2, config=tiny_config, device="cpu"
    )
    # this spacing would plan 1x3x3 kernels and no pooling along z: the warm start must not re-plan
    second = napari_sparse3d.run(
        image, labels, annotated_slices=slices, spacing=(4.0, 1.0, 1.0), max_iterations=2, init=first.model, device="cpu"
    )
    assert second.model.kernel_sizes == first.model.kernel_sizes and second.model.strides == first.model.strides
    path = second.save(tmp_path / "model.pt")
    loaded = load_checkpoint(path)
    assert loaded.kernel_sizes == first.model.kernel_sizes
    np.testing.assert_array_equal(napari_sparse3d.predict(image, loaded, device="cpu"), second.labels)


def test_warm_start_without_config_keeps_the_checkpoints_configuration(small_volume, tiny_config, tmp_path):
    image, labels, truth, slices = small_volume
    config = tiny_config.replace(predict={"mirror_tta": False, "overlap": 0.3}, train={"learning_rate": 1e-3})
    first = napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=2, config=config, device="cpu")
    path = first.save(tmp_path / "model.pt")
    second = napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=2, init=str(path), device="cpu")
    assert second.model.sparse3d.config == first.model.sparse3d.config
    # an explicit configuration still replaces training and prediction settings (not the network)
    third = napari_sparse3d.run(
        image, labels, annotated_slices=slices, max_iterations=1, init=str(path), config="fast", device="cpu"
    )
    assert third.model.sparse3d.config.model == first.model.sparse3d.config.model
    assert third.model.sparse3d.config.train.learning_rate == Config.from_preset("fast").train.learning_rate


def test_checkpoint_carries_the_optimiser_state_into_a_warm_start(small_volume, tiny_config, tmp_path):
    trainer = _trainer(small_volume, tiny_config)
    list(trainer.steps(max_iterations=3))
    saved = _optimizer_state(trainer)
    path = save_checkpoint(trainer.model, tmp_path / "model.pt")
    resumed = _trainer(small_volume, None, init=load_checkpoint(path))
    restored = _optimizer_state(resumed)
    assert restored.keys() == saved.keys() and len(saved) > 0
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(restored[key], value, check_stride=False)
        else:
            assert restored[key] == value
    assert any(k[1] == "step" and float(v) == 3 for k, v in restored.items())
    list(resumed.steps(max_iterations=1))
    assert any(k[1] == "step" and float(v) == 4 for k, v in _optimizer_state(resumed).items())


def test_an_optimiser_state_that_does_not_fit_is_refused_with_a_warning(small_volume, tiny_config, tmp_path):
    trainer = _trainer(small_volume, tiny_config)
    list(trainer.steps(max_iterations=1))
    state = trainer.model.sparse3d.optimizer_state
    first = next(iter(state["state"]))
    state["state"][first]["exp_avg"] = torch.zeros(3)  # a crafted file
    path = save_checkpoint(trainer.model, tmp_path / "model.pt")
    with pytest.warns(RuntimeWarning, match="optimiser state does not fit"):
        resumed = _trainer(small_volume, None, init=load_checkpoint(path))
    assert len(resumed.optimizer.state_dict()["state"]) == 0
    list(resumed.steps(max_iterations=1))


def test_history_is_thinned_in_checkpoints_and_in_memory(small_volume, tiny_config, tmp_path):
    history = [{"iteration": i, "loss": 1.0 / i} for i in range(1, 5001)]
    thin = thin_history(history)
    assert len(thin) == HISTORY_LIMIT
    assert thin[0] == history[0] and thin[-100:] == history[-100:]  # first, and the recent steps one by one
    assert [h["iteration"] for h in thin] == sorted({h["iteration"] for h in thin})
    trainer = _trainer(small_volume, tiny_config)
    trainer.history.extend(history)
    trainer.iteration = 5000
    list(trainer.steps(max_iterations=1))
    assert len(trainer.history) <= 2 * HISTORY_LIMIT
    path = save_checkpoint(trainer.model, tmp_path / "model.pt")
    loaded = load_checkpoint(path).sparse3d.history
    assert len(loaded) == HISTORY_LIMIT and loaded[-1]["iteration"] == 5001


def test_no_step_starts_past_a_time_budget(small_volume, tiny_config):
    reports = list(_trainer(small_volume, tiny_config).steps(max_seconds=1.0))
    assert reports and reports[-1].elapsed - reports[-1].step_seconds <= 1.0
    assert [r.iteration for r in reports] == list(range(1, len(reports) + 1))


def test_a_snapshot_from_another_thread_holds_the_weights_of_one_finished_step(small_volume, tiny_config, tmp_path):
    """What "Save model" in napari reads while the worker trains: never a mix of two steps."""

    from napari_sparse3d.io.checkpoint import load_checkpoint, save_checkpoint

    trainer = _trainer(small_volume, tiny_config)

    def fingerprint(model):
        return tuple(round(float(p.detach().double().sum()), 9) for p in model.parameters())

    per_step = {}
    done = threading.Event()

    def train():
        for report in trainer.steps(max_iterations=40):
            with trainer.weights_lock:  # the state the step left, as the loop left it
                per_step[report.iteration] = fingerprint(trainer.model)
        done.set()

    worker = threading.Thread(target=train)
    worker.start()
    # fingerprint each copy at once and keep only the newest: thousands of copies are
    # taken while 40 steps run, and keeping (or saving) them all costs gigabytes
    seen, last = [], None
    while not done.is_set():
        snap = trainer.snapshot()
        iteration = len(snap.sparse3d.history)
        if iteration:
            seen.append((iteration, fingerprint(snap)))
            last = snap
    worker.join()
    assert len(seen) > 5 and last is not None
    for k, (iteration, print_) in enumerate(seen):
        # the copy's weights are those of exactly the step its history ends with
        assert print_ == per_step[iteration], k
    path = save_checkpoint(last, tmp_path / "snap.pt")
    assert fingerprint(load_checkpoint(path)) == per_step[len(last.sparse3d.history)]


def test_non_finite_loss_keeps_the_last_good_weights(small_volume, tiny_config):
    import torch

    from napari_sparse3d.engine.training import Trainer

    image, labels, truth, slices = small_volume
    trainer = Trainer.from_inputs(image, labels, slices, config=tiny_config, device="cpu")
    steps = trainer.steps(max_iterations=10)
    next(steps)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = trainer.loss_fn
    trainer.loss_fn = lambda *a: real(*a) * float("nan")
    with pytest.warns(RuntimeWarning, match="learning rate is halved"):
        with pytest.raises(FloatingPointError, match="training stopped at iteration 2: 10 steps in a row"):
            next(steps)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_out_of_memory_halves_the_batch_and_says_so(small_volume, tiny_config):
    import torch

    from napari_sparse3d.engine.training import Trainer

    image, labels, truth, slices = small_volume
    config = tiny_config.replace(train={"batch_size": 4})
    trainer = Trainer.from_inputs(image, labels, slices, config=config, device="cpu")
    real_forward = trainer.model.forward
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x)

    trainer.model.forward = forward
    with pytest.warns(RuntimeWarning, match="out of cpu memory: training goes on with batch size 2"):
        reports = list(trainer.steps(max_iterations=2))
    assert [r.iteration for r in reports] == [1, 2] and trainer.batch_size == 1
    assert seen == [4, 2, 1, 1]
    trainer.model.forward = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    with pytest.raises(MemoryError, match="even with one patch of"):
        next(trainer.steps(max_iterations=1))


def test_generator_stops_at_any_step_and_takes_new_annotations(small_volume, tiny_config):
    image, labels, truth, slices = small_volume
    trainer = Trainer.from_inputs(image, labels, slices, config=tiny_config, device="cpu")
    steps = trainer.steps()  # no budget: runs until the caller stops
    first = next(steps)
    before = trainer.annotations.counts().sum()
    corrected = labels.copy()
    corrected[15] = truth[15]  # a corrected slice becomes an annotation
    second = steps.send((corrected, {**slices, 0: slices[0] + [15]}))
    assert second.iteration == first.iteration + 1
    assert trainer.annotations.counts().sum() > before
    steps.close()
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(StopIteration):
        next(steps)
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))


def test_prefetching_thread_ends_with_the_generator_and_drops_stale_batches(small_volume, tiny_config):

    image, labels, truth, slices = small_volume
    cfg = tiny_config.replace(train={"prefetch": True})
    trainer = Trainer.from_inputs(image, labels, slices, config=cfg, device="cpu")
    steps = trainer.steps()
    next(steps)
    assert any(t.name == "sparse3d-prefetch" for t in threading.enumerate())
    generation = trainer._prefetcher.generation
    steps.send(truth)  # dense corrections: batches drawn from the old annotations are now stale
    assert trainer._prefetcher.generation == generation + 1
    next(steps)
    steps.close()
    assert trainer._prefetcher is None
    assert not any(t.name == "sparse3d-prefetch" for t in threading.enumerate())


