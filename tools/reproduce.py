#!/usr/bin/env python
"""Run a reproduction suite and write its tables:
``python tools/reproduce.py SUITE [--data DIR] [--jobs N] [--docs [PATH ...]]``."""

import sys

from metateach.lab.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
