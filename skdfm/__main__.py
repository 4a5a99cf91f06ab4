"""``python -m skdfm``: the ``skdfm`` command."""

import sys

from .cli import main

sys.exit(main())
