"""``python -m sim score PATH... --out scores.parquet``."""

import sys

from sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
