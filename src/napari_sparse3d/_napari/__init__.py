"""The napari plugin: thin Qt over :mod:`napari_sparse3d.loop` and the engine.

Named in ``napari.yaml`` only; nothing else in the package imports it.
"""
