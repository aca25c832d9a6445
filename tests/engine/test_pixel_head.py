"""The pixel classifier: filter bank, fit, its place in training, prediction and checkpoints."""

import numpy as np
import pytest
import torch

from napari_sparse3d.config import Config
from napari_sparse3d.engine.features import _eigenvalues, _smooth, block_boxes, filter_bank, grow, halo, scaled_sigmas
from napari_sparse3d.engine.pixel_head import PixelClassifier, WithPrior, prior, probability_map, training_samples
from napari_sparse3d.engine.prediction import predict_volume
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.trained import from_payload, to_payload
from napari_sparse3d.engine.training import Trainer
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.evaluation.metrics import annotated_slice_mask, mean_foreground_dice


def _config(**model):
    return Config.from_dict({
        "model": {"levels": 2, "base_features": 4, **model},
        "train": {"patch_size": [8, 16, 16], "batch_size": 2, "warmup_steps": 0, "precision": "fp32", "validation": 0.0},
        "predict": {"mirror_tta": False},
    })


def test_closed_form_eigenvalues_match_linalg():
    a = torch.randn(5000, 3, 3, dtype=torch.float64)
    a = a + a.transpose(1, 2)
    a[:10] = torch.diag_embed(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))  # repeated: p = 0
    upper = {(i, j): a[:, i, j].float() for i in range(3) for j in range(i, 3)}
    ours = torch.stack(_eigenvalues(upper), 1)
    torch.testing.assert_close(ours, torch.linalg.eigvalsh(a).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("way", ["one matrix per axis", "matrices over pieces of an axis", "traceable convolution"])
def test_smoothing_is_scipys_gaussian_filter_with_nearest_borders(way, monkeypatch):
    from scipy import ndimage

    from napari_sparse3d.engine import features

    if way == "matrices over pieces of an axis":  # as a long axis is smoothed: 16 voxels at a time, margins between
        monkeypatch.setattr(features, "_MATRIX_MAX", 16)
    if way == "traceable convolution":  # what a traced (exported) module runs
        monkeypatch.setattr(features.torch.jit, "is_tracing", lambda: True)
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(20, 40, 64)).astype(np.float32)
    # radii 3, 8, 24 (where scipy truncates the same way); the z kernel (49 taps at sigma 8) is longer than z
    for sigma in ((1.0, 2.5, 8.0), (8.0, 1.0, 2.5)):
        ours = _smooth(torch.from_numpy(volume)[None], sigma)[0].numpy()
        reference = ndimage.gaussian_filter(volume.astype(np.float64), sigma, mode="nearest", truncate=3.0)
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    untouched = _smooth(torch.from_numpy(volume)[None], (0.1, 0.0, 0.2))[0].numpy()  # below 0.3 voxel: as it was
    np.testing.assert_array_equal(untouched, volume)


def test_a_block_read_with_its_halo_has_the_responses_of_the_whole_volume():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(1, 30, 70, 64)).astype(np.float32))
    sigmas = scaled_sigmas((2.0, 1.0, 1.0))
    assert sigmas[:, 0].max() < sigmas[:, 1].max()  # the coarse axis is smoothed less
    whole = filter_bank(image, sigmas)
    assert whole.shape == (5 * len(sigmas), 30, 70, 64) and torch.isfinite(whole).all()
    box = (slice(5, 20), slice(10, 50), slice(30, 64))  # touches the volume's end in x
    grown, inner = grow(box, halo(sigmas), image.shape[1:])
    part = filter_bank(image[(slice(None), *grown)], sigmas)[(slice(None), *inner)]
    torch.testing.assert_close(part, whole[(slice(None), *box)], atol=2e-4, rtol=1e-4)


def test_the_responses_of_several_channels_are_each_channels_own_in_channel_major_order():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.normal(size=(2, 12, 20, 18)).astype(np.float32))
    sigmas = scaled_sigmas(None, (1.0, 2.0))
    both = filter_bank(image, sigmas)
    own = [filter_bank(image[c : c + 1], sigmas) for c in range(2)]
    assert both.shape == (2 * 2 * 5, 12, 20, 18)
    assert torch.equal(both, torch.cat(own)) and not torch.equal(own[0], own[1])
    # per scale: the smoothed image first, then the gradient magnitude (>= 0), then ascending eigenvalues
    gradient, eigen = own[0][1::5], torch.stack([own[0][k::5] for k in (2, 3, 4)])
    assert (gradient >= 0).all() and (eigen[0] <= eigen[1]).all() and (eigen[1] <= eigen[2]).all()


def test_block_boxes_tile_the_volume_once():
    shape = (13, 100, 37)
    covered = np.zeros(shape, int)
    boxes = block_boxes(shape, 5000)
    for box in boxes:
        assert np.prod([b.stop - b.start for b in box]) <= 5000
        covered[box] += 1
    assert (covered == 1).all() and len(boxes) > 1


def _blobs(seed=0, shape=(24, 48, 48)):
    """Large bright blobs (class 1) with thin bright rims (class 2) on noise: texture and scale tell them apart."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    truth = np.zeros(shape, np.uint8)
    for cz, cy, cx in [(8, 12, 12), (16, 34, 30), (12, 14, 36), (6, 36, 10)]:
        r = np.sqrt(((zz - cz) * 1.0) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2)
        truth[r < 7] = 2
        truth[r < 5.5] = 1
    image = np.where(truth == 1, 1.0, np.where(truth == 2, 2.0, 0.0)) + rng.normal(0, 0.3, shape)
    return image.astype(np.float32), truth


def _annotated_blobs():
    """The blobs, annotated on slices 8 and 16 (class index per voxel, -1 elsewhere)."""
    image, truth = _blobs()
    target = np.full(truth.shape, -1, np.int64)
    target[[8, 16]] = truth[[8, 16]]
    return image, truth, as_volume(image), Normalization((0.0,), (1.0,), (0.0,), (1.0,)), target


def test_the_classifier_learns_from_two_slices_in_a_few_hundred_steps():
    image, truth, volume, norm, target = _annotated_blobs()
    head = PixelClassifier(1, 3)
    uniform = prior(head, volume, norm, (slice(0, 24), slice(0, 48), slice(0, 48)))
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 3))  # not fitted yet
    x, y = training_samples(head, [(volume, norm, target)], seed=0)
    assert x.shape == (int((target >= 0).sum()), head.mean.numel()) and sorted(y.unique().tolist()) == [0, 1, 2]
    head.fit(x, y, seed=0, steps=300)
    probs = probability_map(head, volume, norm)
    assert probs.dtype == np.float16 and probs.shape == (3, *truth.shape)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    unseen = np.ones(truth.shape, bool)
    unseen[[8, 16]] = False
    assert mean_foreground_dice(probs.argmax(0), truth, mask=unseen) > 0.8
    # at most max_samples voxels are kept
    x_small, _ = training_samples(head, [(volume, norm, target)], seed=0, max_samples=500)
    assert 300 < x_small.shape[0] < 700


def test_the_probabilities_are_the_standardised_perceptron_over_every_voxel(monkeypatch):
    """The fast path (standardisation folded into the first layer, the perceptron over chunks of
    voxels) gives the plain formula's probabilities, across chunk borders and a last short chunk."""
    from napari_sparse3d.engine import pixel_head

    monkeypatch.setattr(pixel_head, "MLP_CHUNK", 1000)
    generator = torch.Generator().manual_seed(0)
    head = PixelClassifier(1, 3, spacing=(2.0, 1.0, 1.0))
    for name in ("w1", "b1", "w2", "b2", "w3", "b3"):
        buffer = getattr(head, name)
        buffer.copy_(torch.randn(buffer.shape, generator=generator) / buffer.shape[-1] ** 0.5)
    image = torch.randn((1, 9, 21, 23), generator=generator)  # 4347 voxels: four full chunks and a short one
    feats = filter_bank(image, head.sigmas.numpy()).reshape(head.mean.numel(), -1)
    head.mean.copy_(feats.mean(1) + 0.3)  # off-centre and scaled, as fitted statistics are on other voxels
    head.std.copy_(feats.std(1) * 1.7)
    head.fitted.fill_(1.0)
    standardised = (feats - head.mean[:, None]) / head.std[:, None]
    for m in range(head.members):  # random weights favour a class: even each member out
        h = torch.relu(standardised.T @ head.w1[m].T + head.b1[m])
        h = torch.relu(h @ head.w2[m].T + head.b2[m])
        head.b3[m] -= (h @ head.w3[m].T + head.b3[m]).log_softmax(1).mean(0)
    expected = head.logits(standardised.T).softmax(1).T.reshape(3, 9, 21, 23)
    ours = head.probabilities(image)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(ours.argmax(0), expected.argmax(0)) and len(ours.argmax(0).unique()) == 3


def test_the_prior_of_a_large_box_is_computed_in_blocks_with_the_same_result(monkeypatch):
    """A prediction tile's input (tile + window margins) can hold tens of millions of voxels: the
    filter bank runs block by block, so its memory is bounded by the block, not by the box."""
    from napari_sparse3d.engine import pixel_head

    image, truth = _blobs(shape=(24, 160, 160))  # the blobs sit in the first 48x48; the rest is noise
    volume = as_volume(image)
    norm = Normalization((0.0,), (1.0,), (0.0,), (1.0,))
    target = np.full(truth.shape, -1, np.int64)
    target[[8, 16], :48, :48] = truth[[8, 16], :48, :48]
    head = PixelClassifier(1, 3, spacing=(1.0, 1.0, 1.0))
    head.fit(*training_samples(head, [(volume, norm, target)], seed=0), seed=0, steps=200)
    box = (slice(2, 23), slice(3, 157), slice(0, 150))
    whole = prior(head, volume, norm, box, block_voxels=10**9)
    seen = []
    real = pixel_head.filter_bank
    monkeypatch.setattr(pixel_head, "filter_bank", lambda image, sigmas: (seen.append(image[0].numel()), real(image, sigmas))[1])
    blocked = prior(head, volume, norm, box, block_voxels=60_000)
    blocks = block_boxes((21, 154, 150), 60_000)
    assert len(seen) == len(blocks) > 5
    # each block is read with its margin only: far less than the box
    def read_size(block):
        where = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, block))
        return int(np.prod([g.stop - g.start for g in grow(where, head.halo, volume.spatial_shape)[0]]))

    bound = max(read_size(block) for block in blocks)
    assert max(seen) == bound < 21 * 154 * 150
    assert blocked.shape == whole.shape == (3, 21, 154, 150) and blocked.dtype == torch.float32
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=0)
    assert torch.equal(blocked.argmax(0), whole.argmax(0))
    assert (whole.argmax(0) > 0).any()  # the classifier does find the blobs


def test_training_fits_the_classifier_on_training_voxels_only_and_feeds_its_probabilities(small_volume, monkeypatch):
    image, labels, truth, slices = small_volume
    seen = {}
    real = PixelClassifier.fit

    def spy(self, features, labels_, **kw):
        seen["n"] = labels_.numel()
        return real(self, features, labels_, **kw)

    monkeypatch.setattr(PixelClassifier, "fit", spy)
    config = _config().replace(train={"validation": 0.3})
    trainer = Trainer.from_inputs(image, labels, slices, config=config, device="cpu", seed=0)
    data = trainer.data
    annotated = int((data.annotations[0].target >= 0).sum())
    held = int((data.held_out[0] >= 0).sum())
    assert held > 0 and seen["n"] == annotated - held  # the held-out voxels are not shown to the classifier
    assert bool(trainer.model.pixel_head.fitted)
    source = data.sources[0]
    assert isinstance(source, WithPrior) and source.channels == 4
    # what the network trains on: the image channel, then probabilities the augmentation leaves alone
    x, _, _ = trainer.sampler.sample(4, np.random.default_rng(0))
    probs = x[:, 1:]
    assert x.shape[1] == 4 and probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=5e-3)


def test_the_untrained_network_already_predicts_the_classifiers_segmentation(small_volume):
    image, labels, truth, slices = small_volume
    unseen = ~annotated_slice_mask(truth.shape, slices)
    scores = {}
    for flag in (True, False):
        trainer = Trainer.from_inputs(image, labels, slices, config=_config(pixel_classifier=flag), device="cpu", seed=0)
        model = trainer.snapshot()
        predicted, _ = predict_volume(as_volume(image), model, device="cpu")
        scores[flag] = mean_foreground_dice(predicted, truth, mask=unseen)
    assert scores[True] > 0.9 > scores[False]


def test_checkpoints_carry_the_classifier_and_older_ones_load_without_one(small_volume):
    image, labels, truth, slices = small_volume
    trainer = Trainer.from_inputs(image, labels, slices, config=_config(), device="cpu", seed=0)
    list(trainer.steps(max_iterations=3))
    payload = to_payload(trainer.model, where="memory", package_version="test")
    loaded = from_payload(payload, where="memory")
    assert bool(loaded.pixel_head.fitted)
    a, pa = predict_volume(as_volume(image), trainer.model, device="cpu", keep_probabilities=True)
    b, pb = predict_volume(as_volume(image), loaded, device="cpu", keep_probabilities=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(pa, pb, atol=1e-5)
    # a network written before the classifier existed: no such key in its configuration, no such weights
    old = Trainer.from_inputs(image, labels, slices, config=_config(pixel_classifier=False), device="cpu", seed=0)
    list(old.steps(max_iterations=1))
    payload = to_payload(old.model, where="memory", package_version="old")
    import json

    info = dict(payload["info"])
    raw = json.loads(info["config"])
    del raw["model"]["pixel_classifier"]
    info["config"] = json.dumps(raw)
    payload["info"] = info
    model = from_payload(payload, where="old.pt")
    assert model.pixel_head is None and model.prior_channels == 0
    # a checkpoint whose classifier weights do not fit is refused with the file's name
    payload = to_payload(trainer.model, where="memory", package_version="test")
    payload["state_dict"]["pixel_head.w1"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="bad.pt"):
        from_payload(payload, where="bad.pt")


def test_non_finite_features_are_refused_with_a_clear_error():
    head = PixelClassifier(1, 2)
    x = torch.zeros(10, 20)
    x[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        head.fit(x, torch.zeros(10, dtype=torch.int64), seed=0)
    assert not bool(head.fitted)


def test_a_checkpoint_with_hostile_classifier_scales_is_refused(small_volume):
    """The scales set every block's margin and kernel: NaN failed deep in numpy and 1e6 turned a
    second's prediction into minutes, so a checkpoint's scales are checked when it loads."""
    image, labels, truth, slices = small_volume
    trainer = Trainer.from_inputs(image, labels, slices, config=_config(), device="cpu", seed=0)
    scales = trainer.model.pixel_head.sigmas
    assert from_payload(to_payload(trainer.model, where="memory", package_version="t"), where="ok.pt") is not None
    for bad in (torch.full_like(scales, 1e6), torch.full_like(scales, float("nan")), -scales, torch.zeros_like(scales)):
        payload = to_payload(trainer.model, where="memory", package_version="t")
        payload["state_dict"]["pixel_head.sigmas"] = bad
        with pytest.raises(ValueError, match=r"bad\.pt.*pixel_head\.sigmas must be finite scales"):
            from_payload(payload, where="bad.pt")


def test_the_classifier_takes_explicit_scales_and_checks_them():
    head = PixelClassifier(1, 2, sigmas=scaled_sigmas(None, (1.0, 2.0)))
    assert head.sigmas.shape == (2, 3) and head.mean.numel() == 10 and head.halo == (8, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(scales, 3\)"):
        PixelClassifier(1, 2, sigmas=np.ones((2, 2)))


def test_the_classifier_is_a_bag_of_perceptrons_fitted_on_bootstrap_samples():
    image, truth, volume, norm, target = _annotated_blobs()
    head = PixelClassifier(1, 3)
    x, y = training_samples(head, [(volume, norm, target)], seed=0)
    state = torch.random.get_rng_state()
    head.fit(x, y, seed=0, steps=100)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert head.members >= 2 and all(bool(torch.isfinite(getattr(head, n)).all()) for n in ("w1", "w2", "w3"))
    assert not torch.allclose(head.w1[0], head.w1[1])  # each learnt from its own sample
    # the classifier's probabilities are the members' mean
    z = (x[:500] - head.mean) / head.std
    members = []
    for m in range(head.members):
        h = torch.relu(z @ head.w1[m].T + head.b1[m])
        h = torch.relu(h @ head.w2[m].T + head.b2[m])
        members.append((h @ head.w3[m].T + head.b3[m]).softmax(1))
    torch.testing.assert_close(head.class_probabilities(z), torch.stack(members).mean(0), atol=1e-5, rtol=1e-4)
    again = PixelClassifier(1, 3)
    again.fit(x, y, seed=0, steps=100)
    assert torch.equal(again.w1, head.w1)  # seeded: the same bag


@pytest.mark.parametrize("callers_autocast", [False, True])
def test_a_bfloat16_fit_learns_what_the_float32_fit_learns(callers_autocast):
    image, truth, volume, norm, target = _annotated_blobs()
    x, y = training_samples(PixelClassifier(1, 3), [(volume, norm, target)], seed=0)
    unseen = np.ones(truth.shape, bool)
    unseen[[8, 16]] = False
    dice, heads = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        heads[dtype] = head = PixelClassifier(1, 3)
        # a caller's autocast changes neither the fit's precision nor lets it train on stale weight copies
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=callers_autocast):
            head.fit(x, y, seed=0, steps=300, dtype=dtype)
        dice[dtype] = mean_foreground_dice(probability_map(head, volume, norm).argmax(0), truth, mask=unseen)
    assert dice[torch.bfloat16] > 0.8 and dice[torch.bfloat16] >= dice[torch.float32] - 0.02, dice
    assert not torch.equal(heads[torch.bfloat16].w1, heads[torch.float32].w1)  # it did fit in bfloat16


def test_bfloat16_probabilities_are_the_float32_ones_to_bfloat16_precision():
    image, truth, volume, norm, target = _annotated_blobs()
    head = PixelClassifier(1, 3)
    head.fit(*training_samples(head, [(volume, norm, target)], seed=0), seed=0, steps=300)
    box = tuple(slice(0, s) for s in image.shape)
    exact = prior(head, volume, norm, box)
    low = prior(head, volume, norm, box, dtype=torch.bfloat16, block_voxels=20_000)  # blocks too
    assert low.dtype == torch.float32 and not torch.equal(low, exact)  # it did compute in bfloat16
    assert float((low - exact).abs().max()) < 0.05 and float((low - exact).abs().mean()) < 2e-3
    assert float((low.argmax(0) == exact.argmax(0)).float().mean()) > 0.995
    np.testing.assert_allclose(low.sum(0).numpy(), 1.0, atol=1e-5)
    # the trainer's map and the prediction compute them alike: float16 of the same bfloat16 products
    np.testing.assert_allclose(probability_map(head, volume, norm, torch.bfloat16), low.numpy(), atol=1e-3)


def test_a_bfloat16_member_with_non_finite_weights_is_fitted_again_in_float32(monkeypatch):
    from napari_sparse3d.engine import pixel_head

    image, truth, volume, norm, target = _annotated_blobs()
    head = PixelClassifier(1, 3)
    x, y = training_samples(head, [(volume, norm, target)], seed=0)
    real, calls = pixel_head._fit_member, []

    def fit_member(*args, dtype):
        calls.append(dtype)
        mean, std, layers = real(*args, dtype=dtype)
        if dtype == torch.bfloat16 and len(calls) == 1:
            with torch.no_grad():
                layers[1].weight[0, 0] = float("nan")
        return mean, std, layers

    monkeypatch.setattr(pixel_head, "_fit_member", fit_member)
    head.fit(x, y, seed=0, steps=50, dtype=torch.bfloat16)
    assert calls[:3] == [torch.bfloat16, torch.float32, torch.bfloat16] and len(calls) == head.members + 1
    assert all(bool(torch.isfinite(getattr(head, n)).all()) for n in ("w1", "b1", "w2", "b2", "w3", "b3"))


def test_a_checkpoint_with_one_perceptron_loads_as_a_bag_of_one():
    """Checkpoints of earlier versions hold a single perceptron (2-D weights)."""
    image, truth, volume, norm, target = _annotated_blobs()
    bag = PixelClassifier(1, 3)
    bag.fit(*training_samples(bag, [(volume, norm, target)], seed=0), seed=0, steps=100)
    earlier = {k: (v[0] if k in ("w1", "b1", "w2", "b2", "w3", "b3") else v) for k, v in bag.state_dict().items()}
    assert earlier["w1"].dim() == 2
    one = PixelClassifier(1, 3)
    one.load_state_dict(earlier)
    assert one.members == 1
    probs = one.probabilities(torch.from_numpy(image)[None])
    z = ((filter_bank(torch.from_numpy(image)[None], one.sigmas.numpy()).reshape(one.mean.numel(), -1).T - one.mean)
         / one.std)
    h = torch.relu(z @ earlier["w1"].T + earlier["b1"])
    h = torch.relu(h @ earlier["w2"].T + earlier["b2"])
    expected = (h @ earlier["w3"].T + earlier["b3"]).softmax(1).T.reshape(probs.shape)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    # and a bag of another size takes that size
    two = {k: (v[:2] if k in ("w1", "b1", "w2", "b2", "w3", "b3") else v) for k, v in bag.state_dict().items()}
    other = PixelClassifier(1, 3)
    other.load_state_dict(two)
    assert other.members == 2


def test_a_format_2_checkpoint_loads_with_its_single_perceptron(small_volume):
    image, labels, truth, slices = small_volume
    trainer = Trainer.from_inputs(image, labels, slices, config=_config(), device="cpu", seed=0)
    payload = to_payload(trainer.model, where="memory", package_version="0.1")
    names = [f"pixel_head.{n}" for n in ("w1", "b1", "w2", "b2", "w3", "b3")]
    payload["state_dict"].update({n: payload["state_dict"][n][0] for n in names})  # what version 2 wrote
    payload["format_version"] = 2
    loaded = from_payload(payload, where="v2.pt")
    assert loaded.pixel_head.members == 1 and bool(loaded.pixel_head.fitted)
    predicted, _ = predict_volume(as_volume(image), loaded, device="cpu")
    assert predicted.shape == truth.shape
