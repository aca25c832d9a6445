"""``python -m napari_sparse3d.cli``: the console command."""

import sys

from napari_sparse3d.cli.commands import main

sys.exit(main())
