"""Arrays on disk: large TIFFs are read where needed (page by page, or memory-mapped)."""

import numpy as np


def test_a_compressed_tiff_is_read_page_by_page(tmp_path, monkeypatch):
    import tifffile

    from napari_sparse3d.io.arrays import TiffPages, load_array

    volume = np.random.default_rng(0).integers(0, 60000, (12, 40, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", volume, compression="zlib")
    lazy = load_array(tmp_path / "stack.tif")
    assert isinstance(lazy, TiffPages) and lazy.shape == volume.shape and lazy.dtype == volume.dtype
    read = []
    real = tifffile.TiffPage.asarray
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda page, *a, **k: read.append(page.index) or real(page, *a, **k))
    np.testing.assert_array_equal(lazy[3:5, 10:20, 5:9], volume[3:5, 10:20, 5:9])
    assert sorted(read) == [3, 4]  # only the pages of the region
    np.testing.assert_array_equal(lazy[::5], volume[::5])
    np.testing.assert_array_equal(lazy[7], volume[7])
    np.testing.assert_array_equal(np.asarray(lazy), volume)
    # and the engine reads regions through it
    from napari_sparse3d.engine.volume import as_volume

    np.testing.assert_array_equal(as_volume(lazy).read((slice(2, 4), slice(0, 5), slice(0, 5)))[0], volume[2:4, :5, :5])


def test_an_uncompressed_tiff_is_memory_mapped(tmp_path):
    import tifffile

    from napari_sparse3d.io.arrays import load_array

    volume = np.arange(4 * 6 * 5, dtype=np.uint16).reshape(4, 6, 5)
    tifffile.imwrite(tmp_path / "plain.tif", volume)
    mapped = load_array(tmp_path / "plain.tif")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, volume)
