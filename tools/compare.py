#!/usr/bin/env python
"""Run a comparison over seeds and print its table:
``python tools/compare.py configs/compare/<name>.yaml [key=value ...]``."""

import sys

from metateach.lab.compare_cli import main

if __name__ == "__main__":
    sys.exit(main())
