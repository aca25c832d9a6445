"""Public home of :class:`Project` (``from napari_sparse3d.project import Project``).

The implementation lives in :mod:`napari_sparse3d.io.project`; this module re-exports its public names.
"""

from napari_sparse3d.io.project import *  # noqa: F403
from napari_sparse3d.io.project import __all__  # noqa: F401
