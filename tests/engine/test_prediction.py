import itertools

import numpy as np
import pytest
import torch
import zarr

import napari_sparse3d
from napari_sparse3d.config import Config
from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.prediction import (
    gaussian_importance,
    plan_tiles,
    plan_window,
    predict_blocks,
    resolve_window,
    window_starts,
)
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.trained import ModelInfo
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.io.arrays import load_array


def _model(patch=(8, 16, 16), classes=(0, 1, 5), overlap=0.5, precision="fp32", **predict):
    cfg = Config.from_dict(
        {
            "model": {"levels": 3, "base_features": 4},
            "train": {"patch_size": list(patch), "precision": precision},
            # the plain reference has no mirroring
            "predict": {"overlap": overlap, "batch_size": 3, "mirror_tta": False, **predict},
        }
    )
    torch.manual_seed(0)
    model = UNet3D(1, len(classes), cfg.model).eval()
    model.sparse3d = ModelInfo(cfg, list(classes), Normalization((0.0,), (1.0,), (0.5,), (0.3,)), patch, None, 1)
    with torch.no_grad():  # a classifier that says something, and a network that changes it
        for name in ("w1", "b1", "w2", "b2", "w3", "b3"):
            getattr(model.pixel_head, name).normal_(0.0, 0.5)
        model.pixel_head.fitted.fill_(1.0)
        model.heads[-1].weight.normal_(0.0, 0.5)
    return model


def _reference(image, model):
    """Whole-volume sliding window, written plainly: one accumulator over the volume."""
    info = model.sparse3d
    window = resolve_window(info, model, image.shape, info.config.predict)
    k = len(info.class_values)
    acc = np.zeros((k,) + image.shape, np.float64)
    wsum = np.zeros(image.shape, np.float64)
    g = gaussian_importance(window, info.config.predict.gaussian_sigma)
    norm = info.normalization.apply(image[None].astype(np.float32).copy())
    # the classifier's probabilities of the whole volume at once: tiles must get the same from their margins
    norm = np.concatenate([norm, model.pixel_head.probabilities(torch.from_numpy(norm)).numpy()])
    overlap = info.config.predict.overlap
    for z in window_starts(image.shape[0], window[0], overlap):
        for y in window_starts(image.shape[1], window[1], overlap):
            for x in window_starts(image.shape[2], window[2], overlap):
                crop = norm[:, z : z + window[0], y : y + window[1], x : x + window[2]]
                shape = crop.shape[1:]
                padded = np.pad(crop, [(0, 0)] + [(0, p - s) for p, s in zip(window, shape)])
                with torch.inference_mode():
                    p = torch.softmax(model(torch.from_numpy(padded[None])), 1)[0].numpy()
                sl = (slice(z, z + shape[0]), slice(y, y + shape[1]), slice(x, x + shape[2]))
                gl = g[: shape[0], : shape[1], : shape[2]]
                acc[(slice(None),) + sl] += p[:, : shape[0], : shape[1], : shape[2]] * gl
                wsum[sl] += gl
    probs = acc / wsum
    return probs, np.asarray(info.class_values)[probs.argmax(0)]


@pytest.mark.parametrize(
    "shape, predict",
    [
        ((13, 37, 29), {"window": "patch"}),
        ((8, 16, 16), {"window": "patch"}),
        ((5, 40, 9), {"window": "patch"}),
        ((13, 37, 29), {"window": "auto", "window_voxels": 16 * 32 * 32}),  # larger than the patch
        ((13, 37, 29), {"window": [8, 24, 16], "overlap": 0.3}),
        # many small tiles: windows straddle tiles and are computed for each; the result must not change
        ((13, 37, 29), {"window": "patch", "tile_voxels": 400}),
        ((21, 50, 45), {"window": "auto", "window_voxels": 16 * 32 * 32, "tile_voxels": 5000}),
    ],
)
def test_tiled_prediction_equals_whole_volume_prediction(shape, predict):
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    model = _model(**predict)
    probs_ref, labels_ref = _reference(image, model)
    probs = np.full((3,) + shape, np.nan, np.float32)
    labels = np.full(shape, 255, np.uint8)
    covered = np.zeros(shape, np.int32)
    blocks = list(predict_blocks(as_volume(image), model, device="cpu"))
    for block in blocks:
        probs[(slice(None),) + block.region] = block.probabilities
        labels[block.region] = block.labels
        covered[block.region] += 1
    assert (covered == 1).all()  # blocks tile the volume exactly once
    if predict.get("tile_voxels", 2**23) < np.prod(shape):
        assert len(blocks) > 1
    # to float rounding: the classifier's smoothing is a matrix product whose summation order
    # depends on the length of the block's axes (responses equal to about 1e-7)
    np.testing.assert_allclose(probs, probs_ref, atol=5e-5)
    agree = labels == labels_ref
    # an argmax may flip only where two classes tie to within float rounding
    assert agree.mean() > 0.999
    assert set(np.unique(labels)) <= {0, 1, 5}


def test_planned_window_grows_the_patch_within_the_volume():
    # same proportions as the patch, a multiple of the stride, about the target size
    assert plan_window((16, 48, 48), (8, 8, 8), (60, 256, 256), 32 * 96 * 96) == (32, 96, 96)
    # a short axis caps the window; the others take its share
    assert plan_window((16, 48, 48), (8, 8, 8), (10, 256, 256), 32 * 96 * 96) == (16, 136, 136)
    # never smaller than the patch, never larger than the volume rounded up to the stride
    assert plan_window((16, 48, 48), (8, 8, 8), (60, 256, 256), 10) == (16, 48, 48)
    assert plan_window((16, 48, 48), (8, 8, 8), (12, 20, 20), 10**9) == (16, 24, 24)


def test_tiles_are_whole_chunks_and_bounded():
    tiles = plan_tiles((50, 300, 200), (16, 48, 48), 64 * 128 * 128, chunks=(16, 64, 64))
    covered = np.zeros((50, 300, 200), np.int32)
    for t in tiles:
        covered[t] += 1
        assert all(r.start % c == 0 for r, c in zip(t, (16, 64, 64)))
        assert all(r.stop % c == 0 or r.stop == n for r, c, n in zip(t, (16, 64, 64), (50, 300, 200)))
        assert np.prod([r.stop - r.start for r in t]) <= 64 * 128 * 128
    assert (covered == 1).all()
    assert plan_tiles((10, 20, 30), (8, 8, 8), 10**6) == [(slice(0, 10), slice(0, 20), slice(0, 30))]


def test_window_order_does_not_change_the_result():
    image = np.random.default_rng(2).random((13, 37, 29)).astype(np.float32)
    model = _model()
    a = np.zeros((3, 13, 37, 29), np.float32)
    b = np.zeros_like(a)
    for block in predict_blocks(as_volume(image), model, device="cpu"):
        a[(slice(None),) + block.region] = block.probabilities
    for block in predict_blocks(as_volume(image), model, device="cpu", priority=(12, 36, 28)):
        b[(slice(None),) + block.region] = block.probabilities
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_prediction_into_zarr_matches_numpy(tmp_path):
    image = np.random.default_rng(3).random((13, 37, 29)).astype(np.float32)
    model = _model()
    in_memory = napari_sparse3d.predict(image, model, device="cpu")
    out = zarr.create_array(str(tmp_path / "labels.zarr"), shape=image.shape, dtype="uint8", chunks=(8, 16, 16))
    returned = napari_sparse3d.predict(image, model, out=out, device="cpu")
    assert returned is out
    np.testing.assert_array_equal(out[...], in_memory)
    reopened = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")
    np.testing.assert_array_equal(reopened[...], in_memory)


def test_zarr_image_is_read_lazily(tmp_path):
    image = np.random.default_rng(4).random((13, 37, 29)).astype(np.float32)
    z = zarr.create_array(str(tmp_path / "image.zarr"), shape=image.shape, dtype="float32", chunks=(8, 16, 16))
    z[...] = image
    model = _model()
    from_zarr = napari_sparse3d.predict(str(tmp_path / "image.zarr"), model, device="cpu")
    np.testing.assert_array_equal(from_zarr, napari_sparse3d.predict(image, model, device="cpu"))


def test_progress_reports_every_window():
    reports = []
    image = np.zeros((13, 37, 29), np.float32)
    list(predict_blocks(as_volume(image), _model(), device="cpu", progress=reports.append))
    assert reports[-1].windows_done == reports[-1].windows_total and reports[-1].progress == 1.0


def test_mirror_tta_is_a_valid_distribution():
    image = np.random.default_rng(5).random((8, 16, 16)).astype(np.float32)
    model = _model()
    cfg = model.sparse3d.config.predict.__class__(mirror_tta=True, overlap=0.5)
    (block,) = list(predict_blocks(as_volume(image), model, device="cpu", config=cfg))
    np.testing.assert_allclose(block.probabilities.sum(0), 1.0, atol=1e-5)


def test_window_starts_cover_the_axis():
    for size, window in [(100, 32), (32, 32), (10, 32), (33, 32)]:
        starts = window_starts(size, window, 0.5)
        assert starts[0] == 0 and starts[-1] + window >= size
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + window] = True
        assert covered.all()


def test_each_output_chunk_is_written_once_whole(tmp_path):
    from zarr.storage import LocalStore

    writes = []

    class CountingStore(LocalStore):
        async def set(self, key, value, *args, **kwargs):
            writes.append(key)
            return await super().set(key, value, *args, **kwargs)

    image = np.random.default_rng(6).random((21, 70, 50)).astype(np.float32)
    model = _model(window="patch", tile_voxels=3000)  # many tiles: windows straddle them
    store = CountingStore(str(tmp_path / "labels.zarr"))
    out = zarr.create_array(store, shape=image.shape, dtype="uint8", chunks=(8, 16, 16), config={"write_empty_chunks": True})
    writes.clear()  # the array's metadata
    napari_sparse3d.predict(image, model, out=out, device="cpu")
    chunk_keys = [k for k in writes if k.startswith("c/")]
    expected = int(np.prod([-(-s // c) for s, c in zip(image.shape, (8, 16, 16))]))
    assert len(chunk_keys) == expected and len(set(chunk_keys)) == expected  # every chunk once, none twice
    np.testing.assert_array_equal(out[...], napari_sparse3d.predict(image, model, device="cpu"))


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_yx_extent(tmp_path):
    """A wide volume (8 x 1024 x 1024) costs no more memory than a small one (8 x 256 x 256).

    Sliding windows z-slab by z-slab would hold partial sums of a whole slab: for the wide
    volume about 100 MB more (2 classes + weights, float32); tiles hold only their own.
    """
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "helpers" / "predict_wide.py"
    growth = {}
    for name, shape in (("small", (8, 256, 256)), ("wide", (8, 1024, 1024))):
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(
            [sys.executable, str(script), str(folder), *map(str, shape)], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
        growth[name] = float(done.stdout.split()[-1])
        written = load_array(folder / "labels.zarr")
        assert written.shape == shape and set(np.unique(written[:, ::64, ::64])) <= {0, 1}
    assert growth["wide"] - growth["small"] < 40, growth


def test_class_argmax_is_torchs_argmax_with_the_first_class_winning_ties():
    from napari_sparse3d.engine.prediction import class_argmax

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (4, 7, 9, 11), generator=generator).float()  # many ties
    labels = class_argmax(scores)
    assert labels.dtype == torch.int64 and labels.shape == (7, 9, 11)
    assert torch.equal(labels, torch.from_numpy(scores.numpy().argmax(0)))  # numpy: the first maximum wins
    smooth = torch.rand((3, 5, 6, 7), generator=generator)
    assert torch.equal(class_argmax(smooth), torch.argmax(smooth, dim=0))


def _work(shape, window, overlap):
    """Voxels the window grid computes: per axis, windows times window size."""
    return int(np.prod([len(window_starts(s, w, overlap)) * w for s, w in zip(shape, window)]))


def test_the_auto_window_is_fitted_to_the_volume_to_compute_fewer_voxels():
    from napari_sparse3d.engine.tiling import fit_window

    # the nuclei volume: 32x96x96 windows need 3x4x4 of them, 3.6 computed voxels per voxel
    planned = plan_window((16, 48, 48), (4, 8, 8), (60, 256, 256), 2**18)
    assert planned == (32, 96, 96) and _work((60, 256, 256), planned, 0.25) / (60 * 256 * 256) == pytest.approx(3.6)
    fitted = fit_window(planned, (16, 48, 48), (4, 8, 8), (60, 256, 256), 0.25)
    assert _work((60, 256, 256), fitted, 0.25) < 0.55 * _work((60, 256, 256), planned, 0.25)
    rng = np.random.default_rng(0)
    for _ in range(40):
        shape = tuple(int(v) for v in rng.integers(8, 700, 3))
        patch, divisor = (16, 48, 48), (int(rng.choice([1, 2, 4])), 8, 8)
        overlap = float(rng.choice([0.0, 0.25, 0.5]))
        planned = plan_window(patch, divisor, shape, 2**18)
        fitted = fit_window(planned, patch, divisor, shape, overlap)
        assert _work(shape, fitted, overlap) <= _work(shape, planned, overlap)  # never more work
        assert all(w % d == 0 for w, d in zip(fitted, divisor))
        assert all(min(p, -(-s // d) * d) <= w <= -(-s // d) * d for w, p, s, d in zip(fitted, patch, shape, divisor))
        assert 0.75 <= np.prod(fitted) / np.prod(planned) <= 1.5  # about the planned voxels
        ratios = [f / p for f, p in zip(fitted, planned)]
        assert max(ratios) <= 1.35 * min(ratios) + 1e-9  # about the planned proportions
        for s, w in zip(shape, fitted):  # the grid still covers the axis with at least the overlap
            starts = window_starts(s, w, overlap)
            assert starts[0] == 0 and starts[-1] + w >= s
            assert all(b - a <= w * (1 - overlap) + 1 for a, b in itertools.pairwise(starts))
    # on a volume much larger than the window there is little to gain: about the planned window
    big = fit_window((32, 96, 96), (16, 48, 48), (4, 8, 8), (2000, 4000, 4000), 0.25)
    assert all(abs(b - p) <= 8 for b, p in zip(big, (32, 96, 96)))


def test_fitting_the_window_is_a_bounded_search_on_any_axis(monkeypatch):
    """A network without pooling (stride 1) on a long axis must not try every window length."""
    from napari_sparse3d.engine import tiling

    calls = []
    real = tiling.window_starts
    monkeypatch.setattr(tiling, "window_starts", lambda *a: (calls.append(a), real(*a))[1])
    fitted = tiling.fit_window((1, 512, 512), (1, 64, 64), (1, 1, 1), (1, 100_000, 100_000), 0.5)
    assert len(calls) <= 3 * 2 * (tiling._FIT_CANDIDATES + 2)
    assert _work((1, 100_000, 100_000), fitted, 0.5) <= _work((1, 100_000, 100_000), (1, 512, 512), 0.5)


def test_only_the_auto_window_is_fitted():
    model = _model(patch=(8, 16, 16), window="auto", window_voxels=16 * 32 * 32)
    info = model.sparse3d
    shape = (30, 70, 70)
    planned = plan_window(info.patch_size, model.divisor, shape, 16 * 32 * 32)
    auto = resolve_window(info, model, shape, info.config.predict)
    assert auto != planned and _work(shape, auto, 0.5) < _work(shape, planned, 0.5)
    from napari_sparse3d.config import PredictConfig

    given = PredictConfig(**{**info.config.predict.__dict__, "window": planned})
    assert resolve_window(info, model, shape, given) == planned  # an explicit window is used as given
    patch = PredictConfig(**{**info.config.predict.__dict__, "window": "patch"})
    assert resolve_window(info, model, shape, patch) == (8, 16, 16)
