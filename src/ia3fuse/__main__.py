"""``python -m ia3fuse``: the ``ia3fuse`` command."""

import sys

from .cli import main

sys.exit(main())
