"""``python -m supervisor.worker``: what the supervisor spawns for every node."""

import sys

from .process import main

if __name__ == "__main__":
    sys.exit(main())
