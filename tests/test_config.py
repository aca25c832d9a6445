import pytest

from napari_sparse3d.config import PRESETS, Config


def test_json_round_trip_keeps_every_field():
    cfg = Config.from_dict({"model": {"levels": 3, "strides": [[1, 2, 2], [2, 2, 2]]}, "train": {"patch_size": [8, 16, 16]}})
    again = Config.from_json(cfg.to_json())
    assert again == cfg
    assert again.model.strides == ((1, 2, 2), (2, 2, 2))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    assert isinstance(Config.from_preset(name), Config)


def test_preset_override_and_replace():
    cfg = Config.from_preset("fast", train={"batch_size": 4})
    assert cfg.model.base_features == 8 and cfg.train.batch_size == 4
    assert cfg.replace(train={"batch_size": 1}).train.batch_size == 1


@pytest.mark.parametrize(
    "data, match",
    [
        ({"model": {"levels": 0}}, "model.levels"),
        ({"model": {"norm": "group"}}, "model.norm"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate"),
        ({"train": {"patch_size": [8, 16]}}, "train.patch_size"),
        ({"train": {"foreground_fraction": 1.5}}, "foreground_fraction"),
        ({"predict": {"overlap": 1.0}}, "predict.overlap"),
        ({"train": {"batchsize": 2}}, "unknown keys"),
        ({"training": {}}, "unknown sections"),
        ({"model": {"levels": 3, "kernel_sizes": [[3, 3, 3]]}}, "one entry per level"),
        # NaN passes every comparison: each float field must be refused by name, not trained with
        ({"train": {"dice_weight": float("nan")}}, r"config.train.dice_weight must be a finite number, got nan"),
        ({"train": {"foreground_fraction": float("nan")}}, "config.train.foreground_fraction must be a finite"),
        ({"train": {"rotate_degrees": float("nan")}}, "config.train.rotate_degrees must be a finite"),
        ({"train": {"scale_range": float("nan")}}, "config.train.scale_range must be a finite"),
        ({"train": {"validation": float("nan")}}, "config.train.validation must be a finite"),
        ({"train": {"grad_clip": float("nan")}}, "config.train.grad_clip must be a finite"),
        ({"train": {"learning_rate": float("inf")}}, r"config.train.learning_rate must be a finite number, got inf"),
        ({"predict": {"gaussian_sigma": float("nan")}}, "config.predict.gaussian_sigma must be a finite"),
        # 20 levels: strides of 2**19 voxels, a patch of exbibytes
        ({"model": {"levels": 20}}, r"config.model.levels must be <= 8, got 20"),
        ({"train": {"flip": "yes"}}, r"config.train.flip must be true or false, got 'yes'"),
        ({"predict": {"mirror_tta": 1}}, r"config.predict.mirror_tta must be true or false, got 1"),
        ({"model": 3}, r"config.model must be a mapping of fields, got 3"),
    ],
)
def test_invalid_config_names_the_field(data, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Config.from_dict(data)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        Config.from_preset("huge")
