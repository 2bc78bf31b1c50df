#!/usr/bin/env python
"""How noisy a REINFORCE teacher's gradient estimate is at a policy held still:
``python tools/reinforce_noise.py CONFIG [key=value ...] --episodes 20``."""

import sys

from metateach.lab.reinforce_noise import main

if __name__ == "__main__":
    sys.exit(main())
