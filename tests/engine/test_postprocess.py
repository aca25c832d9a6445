"""Post-processing: fragments removed (clean_labels) and instances by seeded watershed (instances_from_prediction)."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import find_boundaries

from napari_sparse3d.engine.postprocess import clean_labels, instances_from_prediction
from napari_sparse3d.evaluation.metrics import instance_f1


def touching_spheres(shape=(40, 40, 60), radius=10, centres=((20, 20, 21), (20, 20, 39))):
    """Two balls of radius 10 whose centres are 18 voxels apart: they overlap (the first keeps the lens)."""
    grid = np.indices(shape)
    instances = np.zeros(shape, np.uint16)
    for i, centre in enumerate(centres, start=1):
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        instances[inside & (instances == 0)] = i
    return instances


def three_class(instances):
    """0 background, 1 interior, 2 boundary (the inner boundary of each object), as the nuclei task."""
    target = (instances > 0).astype(np.uint8)
    target[find_boundaries(instances, mode="inner")] = 2
    return target


def smoothed_one_hot(target, classes=3, sigma=1.0):
    one_hot = np.stack([target == k for k in range(classes)]).astype(np.float32)
    blurred = ndimage.gaussian_filter(one_hot, sigma=(0, sigma, sigma, sigma))
    return blurred / blurred.sum(0)


def best_iou(found, truth_mask):
    """The IoU of ``truth_mask`` with the instance of ``found`` that overlaps it most."""
    ids, counts = np.unique(found[truth_mask], return_counts=True)
    counts[ids == 0] = 0
    best = found == ids[np.argmax(counts)]
    return (best & truth_mask).sum() / (best | truth_mask).sum()


def assert_two_spheres(found, instances):
    assert found.dtype == np.uint32
    assert sorted(np.unique(found).tolist()) == [0, 1, 2]
    ious = [best_iou(found, instances == i) for i in (1, 2)]
    assert min(ious) > 0.8, ious
    # and the two spheres went to different instances
    assert np.bincount(found[instances == 1]).argmax() != np.bincount(found[instances == 2]).argmax()


def test_the_spheres_touch():
    """The premise of the tests below: their union is one connected object."""
    instances = touching_spheres()
    assert ndimage.label(instances > 0)[1] == 1
    assert ndimage.label(three_class(instances) == 1)[1] == 2  # the boundary class separates the interiors


def test_touching_spheres_from_three_class_labels():
    instances = touching_spheres()
    target = three_class(instances)
    before = target.copy()
    found = instances_from_prediction(target, interior=1, boundary=2)
    assert_two_spheres(found, instances)
    np.testing.assert_array_equal(target, before)
    # every foreground voxel belongs to an instance, no background voxel does
    np.testing.assert_array_equal(found > 0, target > 0)


def test_touching_spheres_from_probabilities_with_class_values():
    instances = touching_spheres()
    probabilities = smoothed_one_hot(three_class(instances))
    found = instances_from_prediction(probabilities, interior=1, boundary=2)
    assert_two_spheres(found, instances)
    # the channels stand for the user's label values
    same = instances_from_prediction(probabilities, interior=5, boundary=9, class_values=[0, 5, 9])
    np.testing.assert_array_equal(same, found)


def test_touching_spheres_from_two_classes_by_distance_peaks():
    instances = touching_spheres()
    found = instances_from_prediction((instances > 0).astype(np.uint8), interior=1)
    assert_two_spheres(found, instances)


def test_with_probabilities_objects_meet_on_the_ridge_of_the_boundary_probability():
    """A thick band of boundary between two seeds is split where the boundary is most likely, not in the middle."""
    x = np.arange(30)
    probabilities = np.zeros((3, 2, 3, 30), np.float32)
    probabilities[1] = (x < 5) | (x >= 25)  # interior at both ends
    band = (x >= 5) & (x < 25)
    probabilities[2] = band * (0.6 + 0.4 * np.exp(-((x - 8) ** 2) / 2.0))  # boundary, most likely at x = 8
    probabilities[0] = 1 - probabilities.sum(0)
    found = instances_from_prediction(probabilities, interior=1, boundary=2)
    row = found[0, 1]
    assert (row[:8] == row[0]).all() and (row[9:] == row[-1]).all() and row[0] != row[-1]
    # the labels alone know no ridge: the band is split in its middle
    labels_row = instances_from_prediction(np.argmax(probabilities, axis=0), interior=1, boundary=2)[0, 1]
    assert (labels_row[:15] == labels_row[0]).all() and (labels_row[15:] == labels_row[-1]).all()


def test_an_object_without_interior_is_kept_and_small_ones_are_dropped():
    target = np.zeros((20, 20, 20), np.uint8)
    target[2:5, 2:5, 2:5] = 2  # all boundary: no seed, still an object
    target[10:18, 10:18, 10:18] = 2
    target[11:17, 11:17, 11:17] = 1
    target[0, 19, 19] = 1  # a one-voxel object
    found = instances_from_prediction(target, interior=1, boundary=2)
    assert found.max() == 3
    assert len(np.unique(found[2:5, 2:5, 2:5])) == 1 and found[3, 3, 3] > 0
    dropped = instances_from_prediction(target, interior=1, boundary=2, min_size=2)
    assert dropped.max() == 2 and dropped[0, 19, 19] == 0  # numbered 1..N again
    assert set(np.unique(dropped).tolist()) == {0, 1, 2}


def test_seed_erosion_cuts_thin_bridges_and_min_seed_size_ignores_specks():
    target = np.zeros((9, 9, 30), np.uint8)
    target[1:8, 1:8, 1:29] = 2
    target[2:7, 2:7, 2:13] = 1  # interior of the left object
    target[2:7, 2:7, 17:28] = 1  # interior of the right object
    target[4, 4, 13:17] = 1  # a one-voxel bridge of (wrong) interior between them
    assert instances_from_prediction(target, interior=1, boundary=2).max() == 1
    assert instances_from_prediction(target, interior=1, boundary=2, seed_erosion=1).max() == 2
    speck = target.copy()
    speck[4, 4, 13:17] = 2
    speck[1, 1, 15] = 1  # a lone interior voxel in the boundary: a spurious seed
    assert instances_from_prediction(speck, interior=1, boundary=2).max() == 3
    assert instances_from_prediction(speck, interior=1, boundary=2, min_seed_size=2).max() == 2


def test_boundary_voxels_go_to_the_nearest_object_in_physical_units():
    """With spacing (3, 1) a voxel 1 row away is farther than one 2 columns away."""
    labels = np.full((7, 7), 2, np.uint8)
    labels[6, 0] = 1  # seed A, bottom left
    labels[0, 3] = 1  # seed B, top middle
    spacing = (3.0, 1.0)
    found = instances_from_prediction(labels, interior=1, boundary=2, spacing=spacing)
    grid = np.indices(labels.shape).reshape(2, -1).T * np.asarray(spacing)
    seeds = np.array([[6, 0], [0, 3]]) * np.asarray(spacing)
    distances = np.linalg.norm(grid[:, None] - seeds[None], axis=-1)
    clear = np.abs(distances[:, 0] - distances[:, 1]) > 1.0  # not a near tie
    nearest = np.where(distances[:, 0] < distances[:, 1], found[6, 0], found[0, 3])
    np.testing.assert_array_equal(found.ravel()[clear], nearest[clear])
    # the voxel (4, 5) is nearer B in voxels (4.5 vs 5.4) but nearer A in microns (7.8 vs 12.2)
    assert found[4, 5] == found[6, 0]
    assert instances_from_prediction(labels, interior=1, boundary=2)[4, 5] == found[0, 3]


def test_instances_refuse_bad_input_naming_the_argument():
    labels = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(TypeError, match="labels_or_probabilities must be an integer label array"):
        instances_from_prediction(labels.astype(bool), interior=1)
    with pytest.raises(ValueError, match="labels_or_probabilities must be 2D"):
        instances_from_prediction(labels[None, None], interior=1)
    with pytest.raises(ValueError, match="class_values must be 3 distinct values"):
        instances_from_prediction(np.zeros((3, 4, 5, 6), np.float32), interior=1, class_values=[0, 1])
    with pytest.raises(ValueError, match="boundary 4 is not one of the class values"):
        instances_from_prediction(np.zeros((3, 4, 5, 6), np.float32), interior=1, boundary=4)
    with pytest.raises(ValueError, match="class_values is for class probabilities"):
        instances_from_prediction(labels, interior=1, class_values=[0, 1])
    with pytest.raises(ValueError, match="boundary must differ from interior"):
        instances_from_prediction(labels, interior=1, boundary=1)
    with pytest.raises(ValueError, match="min_size must be >= 0, got -1"):
        instances_from_prediction(labels, interior=1, min_size=-1)
    with pytest.raises(ValueError, match="spacing must be 3 finite positive numbers"):
        instances_from_prediction(labels, interior=1, spacing=(1, 1))
    with pytest.raises(TypeError, match="interior must be an integer"):
        instances_from_prediction(labels, interior=1.5)


def _nuclei_instances():
    import tifffile

    from napari_sparse3d.sample_data import nuclei_files

    try:
        _, label_path = nuclei_files()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"nuclei sample not available: {exc}")
    return np.asarray(tifffile.imread(label_path))


def test_instances_from_the_true_nuclei_target_match_the_true_nuclei():
    """The watershed itself is sound: the true three-class target gives back the true nuclei."""
    truth = _nuclei_instances()
    target = three_class(truth)
    found = instances_from_prediction(target, interior=1, boundary=2, spacing=(0.29, 0.26, 0.26))
    scores = instance_f1(found, truth, iou=0.5)
    assert scores["f1"] >= 0.9, scores
    assert scores["mean_iou"] > 0.9, scores
    # while the connected components of the foreground merge touching nuclei
    merged = ndimage.label(target > 0)[0].astype(np.uint32)
    assert instance_f1(merged, truth)["f1"] < scores["f1"]


# -- clean_labels ---------------------------------------------------------------------------
def blobs(dtype=np.uint16):
    labels = np.zeros((20, 30, 30), dtype)
    labels[2:12, 2:12, 2:12] = 1  # 1000 voxels
    labels[5, 5, 5] = 2  # a speck of class 2 inside the big object
    labels[15:17, 20:22, 20:22] = 1  # 8 voxels: a fragment
    labels[4:12, 15:25, 15:25] = 2  # 800 voxels
    labels[14:19, 2:12, 2:12] = 1  # 500 voxels
    return labels


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_clean_labels_removes_fragments_and_fills_from_the_neighbour(dtype):
    labels = blobs(dtype)
    before = labels.copy()
    out = clean_labels(labels, min_size=10)
    np.testing.assert_array_equal(labels, before)  # input untouched
    assert out.dtype == labels.dtype and out is not labels
    assert (out[15:17, 20:22, 20:22] == 0).all()  # the fragment in the background became background
    assert out[5, 5, 5] == 1  # the speck inside the object took the object's class, not background
    changed = out != labels
    assert changed.sum() == 8 + 1
    assert (out[4:12, 15:25, 15:25] == 2).all() and (out[14:19, 2:12, 2:12] == 1).all()


def test_clean_labels_keeps_only_the_largest_of_the_chosen_classes():
    labels = blobs()
    labels[5, 5, 5] = 1
    extra = labels.copy()
    extra[14:19, 20:28, 20:28] = 2  # a second object of class 2
    out = clean_labels(extra, keep_largest=[1])
    assert (out == 1).sum() == 1000 and (out[2:12, 2:12, 2:12] == 1).all()
    np.testing.assert_array_equal(out == 2, extra == 2)  # class 2 keeps both objects
    both = clean_labels(extra, keep_largest=(1, 2))
    assert ndimage.label(both == 2)[1] == 1 and (both == 2).sum() == 800
    assert ndimage.label(clean_labels(extra, keep_largest=2) == 2)[1] == 1
    # min_size still applies to the largest
    assert not (clean_labels(extra, keep_largest=[1], min_size=1001) == 1).any()


def test_clean_labels_wedged_fragment_is_split_between_its_neighbours():
    labels = np.zeros((1, 1, 11), np.uint8)
    labels[..., :4] = 1
    labels[..., 4:7] = 3  # the fragment
    labels[..., 7:] = 2
    out = clean_labels(labels, min_size=4).ravel()
    # the middle voxel is as near to both sides: either is right
    assert out[:5].tolist() == [1] * 5 and out[6:].tolist() == [2] * 5 and out[5] in (1, 2)


def test_clean_labels_connectivity_and_everything_removed():
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = 1  # touching at a corner only
    assert (clean_labels(labels, min_size=2) == 0).all()
    np.testing.assert_array_equal(clean_labels(labels, min_size=2, connectivity=3), labels)
    full = np.ones((2, 2, 2), np.uint8)
    assert (clean_labels(full, min_size=9) == 0).all()  # nothing kept: background
    assert (clean_labels(full, min_size=9, background=7) == 7).all()


def test_clean_labels_refuses_bad_input_naming_the_argument():
    labels = blobs()
    with pytest.raises(TypeError, match="labels must be an integer label array, got dtype float32"):
        clean_labels(labels.astype(np.float32), min_size=3)
    with pytest.raises(ValueError, match="min_size must be >= 0, got -2"):
        clean_labels(labels, min_size=-2)
    with pytest.raises(TypeError, match="min_size must be an integer, got True"):
        clean_labels(labels, min_size=True)
    with pytest.raises(ValueError, match="labels must be 2D .* or 3D .*, got 4D"):
        clean_labels(labels[None], min_size=3)
    with pytest.raises(ValueError, match="keep_largest must not name the background value 0"):
        clean_labels(labels, keep_largest=[0, 1])
    with pytest.raises(TypeError, match="keep_largest must be an iterable of integer class values"):
        clean_labels(labels, keep_largest="1")
    with pytest.raises(ValueError, match="connectivity must be 1 .* to 3"):
        clean_labels(labels, min_size=3, connectivity=4)
