"""``python -m keyrelay``: the same as the ``keyrelay`` command."""

import sys

from keyrelay.cli import main

sys.exit(main())
