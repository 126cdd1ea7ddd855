"""``python -m reformer``: the same command line as ``reformer``."""

import sys

from reformer.cli import main

if __name__ == "__main__":
    sys.exit(main())
