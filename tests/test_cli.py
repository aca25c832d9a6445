import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_sparse3d.cli import build_parser, main, parse_slices
from napari_sparse3d.io.arrays import load_array


@pytest.fixture
def files(small_volume, tiny_config, tmp_path):
    image, labels, _, _ = small_volume
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    np.save(tmp_path / "second.npy", image[:, ::-1].copy())
    (tmp_path / "config.json").write_text(tiny_config.to_json())
    return tmp_path


def test_train_then_predict_round_trip(files, capsys):
    d = files
    common = ["--config", str(d / "config.json"), "--device", "cpu", "--quiet"]
    assert main(["train", str(d / "image.tif"), str(d / "labels.tif"), "--slices", "z=8", "--slices", "y=12",
                 "--slices", "x=10", "--iterations", "3", "--output", str(d / "model.pt"), *common]) == 0
    assert (d / "model.pt").is_file()
    assert main(["predict", str(d / "model.pt"), str(d / "image.tif"), str(d / "second.npy"),
                 "--output-dir", str(d / "out"), "--device", "cpu", "--quiet"]) == 0
    assert main(["predict", str(d / "model.pt"), str(d / "image.tif"), "--output-dir", str(d / "outz"),
                 "--format", "zarr", "--quiet"]) == 0
    first = tifffile.imread(d / "out" / "image_labels.tif")
    assert first.shape == (20, 36, 28)
    assert tifffile.imread(d / "out" / "second_labels.tif").shape == (20, 36, 28)
    np.testing.assert_array_equal(load_array(d / "outz" / "image_labels.zarr")[...], first)
    import napari_sparse3d

    np.testing.assert_array_equal(first, napari_sparse3d.predict(str(d / "image.tif"), str(d / "model.pt")))


def test_run_writes_labels_checkpoint_and_views(files, capsys):
    d = files
    assert main(["run", str(d / "image.tif"), str(d / "labels.tif"), "--slices", "0=8", "--slices", "1=12",
                 "--iterations", "2", "--config", str(d / "config.json"), "--output-dir", str(d / "run"), "--quiet"]) == 0
    for name in ("labels.tif", "model.pt", "views.png", "summary.json"):
        assert (d / "run" / name).is_file()
    from skimage.io import imread

    views = imread(d / "run" / "views.png")
    assert views.ndim == 3 and views.shape[2] == 3 and views.std() > 0
    assert json.loads((d / "run" / "summary.json").read_text())["iterations"] == 2


def test_run_on_sample_data_reports_dice(tmp_path, tiny_config):
    (tmp_path / "c.json").write_text(tiny_config.replace(train={"patch_size": [16, 32, 32]}).to_json())
    assert main(["run", "--sample", "cells", "--iterations", "2", "--config", str(tmp_path / "c.json"),
                 "--output-dir", str(tmp_path / "demo"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["dice_outside_annotated_slices"]) == {"0", "1"}


def test_errors_are_one_clear_line(files, capsys):
    d = files
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(d / "image.tif"), str(d / "labels.tif"), "--slices", "z=99", "--output", str(d / "m.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "annotated_slices[0]: index 99 is out of range" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["train", str(d / "image.tif"), str(d / "labels.tif"), "--slices", "w=3", "--output", str(d / "m.pt")])
    assert "--slices expects AXIS=I,J" in capsys.readouterr().err


def test_parse_slices():
    assert parse_slices(["z=1,2", "x=5", "z=7"]) == {0: [1, 2, 7], 2: [5]}
    assert parse_slices(None) is None


def test_help_explains_every_option():
    parser = build_parser()
    for command in ("train", "predict", "run"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{command} {action.dest} has no help"
    out = subprocess.run([sys.executable, "-m", "napari_sparse3d.cli", "run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--sample" in out.stdout and "--seconds" in out.stdout


def test_project_commands_make_train_resume_and_describe(files, capsys):
    d = files
    project = d / "cells.zarr"
    assert main(["project", str(project), str(d / "image.tif"), str(d / "labels.tif"), "--slices", "z=8",
                 "--slices", "y=12", "--spacing", "2", "1", "1"]) == 0
    assert main(["train", str(project), "--iterations", "2", "--config", str(d / "config.json"), "--device", "cpu",
                 "--quiet"]) == 0
    # no --config: the project's own configuration, and training continues from its checkpoint
    assert main(["train", str(project), "--iterations", "1", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["project", str(project)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["iterations"] == 3 and info["spacing"] == [2.0, 1.0, 1.0]
    assert info["annotated_slices"] == {"0": [8], "1": [12]} and info["prediction"] is True
    assert main(["run", str(project), "--iterations", "1", "--device", "cpu", "--output-dir", str(d / "prun"),
                 "--quiet"]) == 0
    assert (d / "prun" / "views.png").is_file()
    # a referenced image that changed is refused with a clear message
    ref = d / "ref.zarr"
    assert main(["project", str(ref), str(d / "image.tif"), "--reference"]) == 0
    tifffile.imwrite(d / "image.tif", np.zeros((20, 36, 28), np.float32))
    with pytest.raises(SystemExit) as exit_info:
        main(["project", str(ref)])
    assert exit_info.value.code == 2
    assert "changed since the project was saved" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(d / "image.tif"), "--iterations", "1"])
    assert "train needs IMAGE LABELS --output MODEL.pt, or a project folder" in capsys.readouterr().err


def test_voxel_size_recorded_in_the_tiff_is_the_spacing_unless_given(small_volume, tmp_path, capsys):
    image, labels, _, _ = small_volume
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, image.astype(np.float32), imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"spacing": 2.0, "unit": "um"})
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    assert main(["project", str(tmp_path / "a.zarr"), str(path), str(tmp_path / "labels.tif"), "--slices", "z=8"]) == 0
    assert "voxel size from imagej.tif: 2 x 0.5 x 0.5" in capsys.readouterr().err
    assert main(["project", str(tmp_path / "a.zarr")]) == 0
    assert json.loads(capsys.readouterr().out)["spacing"] == [2.0, 0.5, 0.5]
    # --spacing wins over the file
    assert main(["project", str(tmp_path / "b.zarr"), str(path), "--spacing", "1", "1", "1"]) == 0
    assert "voxel size from" not in capsys.readouterr().err
    assert main(["project", str(tmp_path / "b.zarr")]) == 0
    assert json.loads(capsys.readouterr().out)["spacing"] in (None, [1.0, 1.0, 1.0])
