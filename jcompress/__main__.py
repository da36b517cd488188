"""``python -m jcompress``: the same as the ``jcompress`` command."""

import sys

from jcompress.cli import main

sys.exit(main())
