"""``python -m pickalign``: the ``pickalign`` command."""

import sys

from pickalign.cli import main

sys.exit(main())
