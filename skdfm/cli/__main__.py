"""``python -m skdfm.cli``: the ``skdfm`` command."""

import sys

from .command import main

sys.exit(main())
