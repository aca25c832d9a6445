"""The console command ``napari-sparse3d``: train, predict and run without a GUI.

Examples::

    napari-sparse3d run --sample cells --seconds 60 --output-dir demo
    napari-sparse3d train image.tif labels.tif --slices z=10,30 --slices y=64 --seconds 300 --output model.pt
    napari-sparse3d train a.tif a_labels.tif b.tif b_labels.tif --slices 1:z=10 --slices 2:z=5,40 --output model.pt
    napari-sparse3d predict model.pt a.tif b.zarr c.npy --output-dir predictions --format zarr
"""


from napari_sparse3d.cli.commands import main, output_stems
from napari_sparse3d.cli.parser import build_parser, parse_slices, training_pairs, volume_slices

__all__ = ["build_parser", "main", "output_stems", "parse_slices", "training_pairs", "volume_slices"]
