"""``python -m rlhf_launch ARGS``: the same as ``rlhf-launch ARGS``."""

from __future__ import annotations

import sys

from rlhf_launch.frontend.cli import main

if __name__ == "__main__":
    sys.exit(main())
