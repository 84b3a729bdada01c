"""``python -m actatlas.cli``."""

import sys

from . import main

sys.exit(main())
