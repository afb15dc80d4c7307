"""``python -m async_ckpt``: the ``async-ckpt`` command line (`async_ckpt.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
