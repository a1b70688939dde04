"""``python -m vblora``: the same command line as ``vblora``."""

import sys

from .cli import main

sys.exit(main())
