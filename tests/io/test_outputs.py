"""Output paths never destroy what the user did not ask to replace; interrupted outputs are recognisable."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
import zarr

import napari_sparse3d
from napari_sparse3d.cli import main, output_stems
from napari_sparse3d.io.arrays import load_array, save_array


@pytest.fixture
def model_path(tiny_checkpoint):
    return tiny_checkpoint[1]


@pytest.fixture
def image(tmp_path):
    data = np.random.default_rng(1).normal(size=(12, 24, 24)).astype(np.float32)
    path = tmp_path / "image.zarr"
    z = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(6, 12, 12))
    z[...] = data
    return data, path


def _folder_with_work(path):
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    return path


def test_predict_refuses_to_wipe_an_existing_folder(tmp_path, image, model_path):
    data, _ = image
    folder = _folder_with_work(tmp_path / "results")
    with pytest.raises(ValueError, match="out: .*results' already exists; refusing to replace it"):
        napari_sparse3d.predict(data, model_path, out=folder, device="cpu")
    with pytest.raises(ValueError, match="is not an earlier zarr prediction; refusing to replace it even with overwrite"):
        napari_sparse3d.predict(data, model_path, out=folder, overwrite=True, device="cpu")
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.zarr", "results"]  # nothing left aside


def test_predict_never_writes_over_its_input(image, model_path):
    data, path = image
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is \\(or contains, or lies inside\\) the input"):
            napari_sparse3d.predict(str(path), model_path, out=path, overwrite=overwrite, device="cpu")
        with pytest.raises(ValueError, match="the input"):
            napari_sparse3d.predict(str(path), model_path, out=path / "inside", overwrite=overwrite, device="cpu")
        with pytest.raises(ValueError, match="the input"):
            napari_sparse3d.predict(str(path), model_path, out=model_path, overwrite=overwrite, device="cpu")
    np.testing.assert_array_equal(load_array(path)[...], data)


def test_overwrite_replaces_an_earlier_prediction(tmp_path, image, model_path):
    data, _ = image
    out = tmp_path / "labels.zarr"
    first = napari_sparse3d.predict(data, model_path, out=out, device="cpu")
    assert dict(first.attrs)["napari_sparse3d"] == {"complete": True}
    with pytest.raises(ValueError, match="already exists"):
        napari_sparse3d.predict(data, model_path, out=out, device="cpu")
    second = napari_sparse3d.predict(data * 0, model_path, out=out, overwrite=True, device="cpu")
    expected = napari_sparse3d.predict(data * 0, model_path, device="cpu")
    np.testing.assert_array_equal(load_array(out)[...], expected)
    np.testing.assert_array_equal(second[...], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.zarr", "labels.zarr"]


def test_an_interrupted_prediction_leaves_no_output_and_a_given_array_marked(tmp_path, image, model_path):
    data, _ = image
    out = tmp_path / "labels.zarr"

    def interrupt(report):
        if getattr(report, "windows_done", 0) >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        napari_sparse3d.predict(data, model_path, out=out, device="cpu", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.zarr"]
    given = zarr.create_array(str(tmp_path / "given.zarr"), shape=data.shape, dtype=np.uint8, chunks=(6, 12, 12))
    with pytest.raises(KeyboardInterrupt):
        napari_sparse3d.predict(data, model_path, out=given, device="cpu", progress=interrupt)
    with pytest.raises(ValueError, match="incomplete output of an interrupted prediction"):
        load_array(tmp_path / "given.zarr")
    napari_sparse3d.predict(data, model_path, out=given, device="cpu")
    assert load_array(tmp_path / "given.zarr").shape == data.shape


KILLED = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import napari_sparse3d

    image = np.random.default_rng(2).normal(size=(48, 256, 256)).astype(np.float32)

    def slowly(report):
        if hasattr(report, "windows_done"):
            print("WINDOWS", report.windows_done, flush=True)
            time.sleep(0.2)

    napari_sparse3d.predict(image, sys.argv[1], out=sys.argv[2], device="cpu", progress=slowly)
    print("DONE", flush=True)
    """
)


def test_a_prediction_killed_while_writing_zarr_is_recognisably_incomplete(tmp_path, model_path):
    script = tmp_path / "child.py"
    script.write_text(KILLED)
    out = tmp_path / "out" / "labels.zarr"
    child = subprocess.Popen(
        [sys.executable, str(script), str(model_path), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in child.stdout:
            if line.startswith("WINDOWS") and int(line.split()[1]) >= 2:
                break
            assert not line.startswith("DONE"), "the prediction finished before it could be killed"
        else:
            pytest.fail(f"the child printed no progress: {child.stderr.read()}")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()
    assert not out.exists()  # nothing under the name asked for
    partial = list(out.parent.iterdir())
    assert len(partial) == 1 and partial[0].name.startswith(".labels.zarr.partial-")
    with pytest.raises(ValueError, match="incomplete output of an interrupted prediction"):
        load_array(partial[0])


def test_save_array_refuses_existing_files_and_replaces_only_its_kind(tmp_path):
    target = tmp_path / "labels.tif"
    save_array(target, np.ones((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match="already exists"):
        save_array(target, np.zeros((2, 3, 4), np.uint8))
    save_array(target, np.zeros((2, 3, 4), np.uint8), overwrite=True)
    assert tifffile.imread(target).max() == 0
    folder = _folder_with_work(tmp_path / "notes.zarr")
    with pytest.raises(ValueError, match="not an earlier .zarr array"):
        save_array(folder, np.zeros((2, 3, 4), np.uint8), overwrite=True)
    assert (folder / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif", "notes.zarr"]


def test_output_names_of_several_inputs_never_collide():
    names = output_stems(["a.tif", "b.tif", "a.zarr", "d1/c.npy", "d2/c.npy", "a_tif.npy"])
    assert len(set(names)) == len(names)
    assert names[1] == "b" and names[0] != names[2]


def test_console_refuses_to_replace_outputs_before_working(tmp_path, capsys, model_path):
    data = np.random.default_rng(3).normal(size=(12, 24, 24)).astype(np.float32)
    for name in ("a.tif", "a.npy"):
        save_array(tmp_path / name, data)
    out = tmp_path / "pred"
    assert main(["predict", str(model_path), str(tmp_path / "a.tif"), str(tmp_path / "a.npy"), "-o", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_npy_labels.tif", "a_tif_labels.tif"]
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(model_path), str(tmp_path / "a.npy"), str(tmp_path / "a.tif"), "-o", str(out), "--device",
              "cpu", "--quiet"])
    assert exit_info.value.code == 2 and "already exists; refusing to replace it" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert main(["predict", str(model_path), str(tmp_path / "a.tif"), str(tmp_path / "a.npy"), "-o", str(out),
                 "--device", "cpu", "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == written
    # train: an existing checkpoint is refused before any training
    labels = np.zeros(data.shape, np.uint8)
    labels[6, :12], labels[6, 12:] = 1, 2
    save_array(tmp_path / "labels.tif", labels)
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path / "a.tif"), str(tmp_path / "labels.tif"), "-o", str(model_path), "--iterations", "1",
              "--device", "cpu", "--quiet"])
    assert "model.pt' already exists" in capsys.readouterr().err
    # run: an output folder holding an earlier run is refused before training
    run_dir = _folder_with_work(tmp_path / "run")
    (run_dir / "labels.tif").write_bytes(b"an earlier result")
    with pytest.raises(SystemExit):
        main(["run", "--sample", "cells", "--iterations", "1", "--device", "cpu", "--quiet", "-o", str(run_dir)])
    assert "labels.tif' already exists" in capsys.readouterr().err
    assert (run_dir / "labels.tif").read_bytes() == b"an earlier result"
