"""The voxel size a TIFF or OME-Zarr file records, read back the way the plugin reads it."""

import numpy as np
import pytest
import tifffile

from napari_sparse3d.io.ome import create_label_image
from napari_sparse3d.io.voxel_size import file_voxel_size

VOLUME = np.zeros((4, 6, 8), np.uint16)


def test_imagej_tiff_resolution_tags_and_spacing(tmp_path):
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, VOLUME, imagej=True, resolution=(1 / 0.25, 1 / 0.5), metadata={"spacing": 2.0, "unit": "um"})
    assert file_voxel_size(path) == pytest.approx((2.0, 0.5, 0.25))


def test_imagej_tiff_in_nanometres_comes_back_in_micrometres(tmp_path):
    path = tmp_path / "nm.tif"
    tifffile.imwrite(path, VOLUME, imagej=True, resolution=(1 / 100, 1 / 100), metadata={"spacing": 300, "unit": "nm"})
    assert file_voxel_size(path) == pytest.approx((0.3, 0.1, 0.1))


def test_ome_tiff_physical_sizes(tmp_path):
    path = tmp_path / "image.ome.tif"
    metadata = {"axes": "ZYX", "PhysicalSizeZ": 1.5, "PhysicalSizeY": 0.2, "PhysicalSizeX": 0.2,
                "PhysicalSizeZUnit": "µm", "PhysicalSizeYUnit": "nm", "PhysicalSizeXUnit": "nm"}
    tifffile.imwrite(path, VOLUME, ome=True, metadata=metadata)
    assert file_voxel_size(path) == pytest.approx((1.5, 0.0002, 0.0002))


def test_what_a_file_does_not_record_is_unknown(tmp_path):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, VOLUME, photometric="minisblack")
    assert file_voxel_size(plain) is None
    # x and y known, z not: not guessed
    xy_only = tmp_path / "xy.tif"
    tifffile.imwrite(xy_only, VOLUME, photometric="minisblack", resolution=(2.0, 2.0), resolutionunit="CENTIMETER")
    assert file_voxel_size(xy_only) is None
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not a tiff")
    assert file_voxel_size(broken) is None
    assert file_voxel_size(tmp_path / "missing.tif") is None
    assert file_voxel_size(tmp_path) is None  # a folder that is no OME-Zarr


def test_ome_zarr_scale(tmp_path):
    path = tmp_path / "labels.zarr"
    create_label_image(path, VOLUME.shape, np.uint8, chunks=(4, 6, 8), spacing=(3.0, 0.5, 0.5))
    assert file_voxel_size(path) == pytest.approx((3.0, 0.5, 0.5))
