#!/usr/bin/env python
"""Train an experiment: ``python tools/train.py configs/<experiment>.yaml [key=value ...]``."""

import sys

from metateach.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
