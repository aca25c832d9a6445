"""Training one model on several sparsely annotated volumes (the paper's fully automatic use)."""

import numpy as np
import pytest
import tifffile

import napari_sparse3d
from napari_sparse3d.cli import main, training_pairs, volume_slices
from napari_sparse3d.engine.sampling import MultiSampler
from napari_sparse3d.engine.training import Trainer
from napari_sparse3d.engine.volume import Volume


def _volume(seed, shape, value):
    """A noisy volume with a bright cube of class ``value``; labels annotate one z slice fully."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.2, shape).astype(np.float32)
    truth = np.zeros(shape, np.uint8)
    z, y, x = (s // 4 for s in shape)
    truth[z : 3 * z, y : 3 * y, x : 3 * x] = value
    image[truth > 0] += 2.0
    labels = np.zeros(shape, np.uint8)
    mid = shape[0] // 2
    labels[mid] = truth[mid]
    return image, labels, {0: [mid]}


def test_patches_are_drawn_from_every_volume_in_one_class_order(tiny_config):
    a = _volume(0, (12, 24, 24), 1)
    b = _volume(1, (16, 32, 20), 2)  # another shape, another class
    trainer = Trainer.from_many([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], config=tiny_config, device="cpu")
    assert trainer.class_values == [0, 1, 2]  # the union: neither volume annotates all three
    assert isinstance(trainer.sampler, MultiSampler) and len(trainer.sampler.samplers) == 2
    # each volume's targets are indexed by the shared order: b's label 2 is class index 2
    assert set(np.unique(trainer.all_annotations[1].target)) == {-1, 0, 2}
    reports = list(trainer.steps(max_iterations=12))
    assert len(reports) == 12 and all(np.isfinite(r.loss) for r in reports)
    drawn = trainer.sampler.drawn
    assert sum(drawn) == 12 * tiny_config.train.batch_size
    assert min(drawn) >= 2  # uniform over volumes: 12 draws, each volume at least twice (p of failing < 0.4%)


def test_each_volume_is_normalised_by_its_own_statistics(tiny_config):
    a = _volume(0, (12, 24, 24), 1)
    b = _volume(1, (12, 24, 24), 1)
    brighter = b[0] * 50 + 1000  # another microscope's gain and offset
    trainer = Trainer.from_many([a[0], brighter], [a[1], b[1]], [a[2], b[2]], config=tiny_config, device="cpu")
    means = [n.mean[0] for n in trainer.normalizations]
    assert means[1] > 500 and means[0] < 5  # "image" normalisation: statistics of each volume
    batch = trainer.sampler.samplers[1].sample(2, np.random.default_rng(0))[0]
    assert abs(float(batch.mean())) < 3  # patches of the bright volume arrive z-scored, not at ~1000


def test_run_takes_several_volumes_and_returns_one_result_each(tiny_config):
    a = _volume(0, (12, 24, 24), 1)
    b = _volume(1, (16, 24, 32), 1)
    results = napari_sparse3d.run(
        [a[0], b[0]], [a[1], b[1]], annotated_slices=[a[2], b[2]], max_iterations=3, config=tiny_config, device="cpu"
    )
    assert len(results) == 2
    assert results[0].labels.shape == a[0].shape and results[1].labels.shape == b[0].shape
    assert results[0].model is results[1].model and results[0].history is results[1].history
    assert results[1].probabilities.shape == (2, *b[0].shape)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": "one"}, "labels must be a list with one entry per image (2)"),
        ({"annotated_slices": {0: [3]}}, "annotated_slices must be a list with one entry per image (2) when image is a list"),
        ({"annotated_slices": [{0: [3]}]}, "got 1 entries"),
    ],
)
def test_per_volume_arguments_are_checked(tiny_config, kwargs, message):
    a = _volume(0, (12, 24, 24), 1)
    args = {"labels": [a[1], a[1]], "annotated_slices": [a[2], a[2]]}
    if kwargs.get("labels") == "one":
        kwargs = {"labels": a[1]}
    args.update(kwargs)
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        napari_sparse3d.run([a[0], a[0]], max_iterations=1, config=tiny_config, device="cpu", **args)


def test_volumes_must_agree_on_channels(tiny_config):
    a = _volume(0, (12, 24, 24), 1)
    two_channels = Volume(np.stack([a[0], a[0]], axis=0), 0)
    with pytest.raises(ValueError, match="same number of channels: image 0 has 1, image 1 has 2"):
        Trainer.from_many([a[0], two_channels], [a[1], a[1]], [a[2], a[2]], config=tiny_config, device="cpu")


def test_a_volume_without_annotations_is_named():
    a = _volume(0, (12, 24, 24), 1)
    with pytest.raises(ValueError, match="volume 1: labels hold no annotations"):
        Trainer.from_many([a[0], a[0]], [a[1], np.zeros_like(a[1])], [a[2], None], device="cpu")


def test_console_trains_on_several_pairs(tmp_path, tiny_config, capsys):
    paths = []
    for i, shape in enumerate([(12, 24, 24), (14, 24, 28)]):
        image, labels, _ = _volume(i, shape, 1)
        tifffile.imwrite(tmp_path / f"img{i}.tif", image)
        tifffile.imwrite(tmp_path / f"lab{i}.tif", labels)
        paths += [str(tmp_path / f"img{i}.tif"), str(tmp_path / f"lab{i}.tif")]
    (tmp_path / "config.json").write_text(tiny_config.to_json())
    argv = ["train", *paths, "--slices", "1:z=6", "--slices", "2:z=7", "--iterations", "2", "--config",
            str(tmp_path / "config.json"), "--device", "cpu", "--quiet", "--output", str(tmp_path / "m.pt")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps on 2 volumes" in out and (tmp_path / "m.pt").exists()


def test_console_pairs_and_slices_are_parsed():
    assert training_pairs(["a", "b", "P", "c", "d"], lambda p: p == "P") == [("a", "b"), ("P", None), ("c", "d")]
    with pytest.raises(ValueError, match="has no LABELS after it"):
        training_pairs(["a", "b", "c"], lambda p: False)
    assert volume_slices(["z=1", "2:y=4"], 2) == [{0: [1]}, {0: [1], 1: [4]}]
    with pytest.raises(Exception, match="volume 3 does not exist"):
        volume_slices(["3:z=1"], 2)
