"""``python -m lightning_ties``: the same command as the ``lightning-ties`` console script."""

import sys

from .cli import main

sys.exit(main())
