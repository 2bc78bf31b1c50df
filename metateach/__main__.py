"""``python -m metateach COMMAND ...``, the same as the ``metateach`` command."""

import sys

from metateach.cli import main

sys.exit(main())
