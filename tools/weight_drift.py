#!/usr/bin/env python
"""Split the drift of a teacher's weights into the teacher's updates and the student's steps:
``python tools/weight_drift.py CONFIG --start STEP --steps N [key=value ...]``."""

import sys

from metateach.lab.drift import main

if __name__ == "__main__":
    sys.exit(main())
