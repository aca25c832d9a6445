"""What the two docks share per viewer (:mod:`napari_sparse3d._napari.state`), on a canvas-less viewer model."""


import numpy as np
import pytest


def test_loop_state_follows_the_viewer():
    """The shared state on a canvas-less ViewerModel: axes, slices, view region, corrections."""
    pytest.importorskip("napari")
    from napari.components import ViewerModel

    from napari_sparse3d._napari.state import METADATA_KEY, LoopState

    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((10, 20, 30), np.float32), scale=(2.0, 1.0, 1.0))
    labels = viewer.add_labels(np.zeros((10, 20, 30), np.uint8), scale=(2.0, 1.0, 1.0))
    prediction = viewer.add_labels(np.zeros((10, 20, 30), np.uint8), scale=(2.0, 1.0, 1.0))
    state = LoopState(viewer)
    state.image_layer, state.labels_layer, state.prediction_layer = image, labels, prediction
    assert state.spacing() == (2.0, 1.0, 1.0)
    state.go_to(1, 7)
    assert state.current_slice() == (1, 7)
    assert state.view_region() == (slice(None), slice(7, 8), slice(None))
    state.go_to(0, 4)
    assert state.current_slice() == (0, 4)
    state.register().mark(0, 4)
    assert labels.metadata[METADATA_KEY]["annotated_slices"] == {"0": [4]}
    # a new state (e.g. another viewer session) reads the register back from the layer
    again = LoopState(viewer)
    again.labels_layer = labels
    assert again.register().as_dict() == {0: [4]}
    # corrections: paint events on the prediction layer name their slices
    state.reset_corrections()
    prediction.events.paint.connect(lambda event: state.record_paint(event.value))
    prediction.data_setitem((np.array([4, 4]), np.array([1, 2]), np.array([3, 3])), 2)
    assert state.corrected_slices() == {0: [4]}
    viewer.dims.ndisplay = 3
    assert state.current_slice() is None
    assert state.view_region() == (slice(None),) * 3
