#!/usr/bin/env python
"""Time teaching steps against a plain step, as ratios measured in one run:
``python tools/bench.py [--json]``."""

import sys

from metateach.lab.bench import main

if __name__ == "__main__":
    sys.exit(main())
