"""The napari plugin's tests: every test in this folder needs napari and a display (Xvfb)."""

from pathlib import Path

import pytest

pytest.importorskip("napari")

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.gui)
