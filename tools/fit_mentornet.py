#!/usr/bin/env python
"""Fit MentorNet-DD's network on a run's sample record, and draw what it learned:
``python tools/fit_mentornet.py RUN [--percentile 0.9] [--steps 30000] [--seed 0]``."""

import sys

from metateach.teachers.mentornet import main

if __name__ == "__main__":
    sys.exit(main())
