"""`python -m fedpeft ...`: the same command line as the `fedpeft` script."""

import sys

from fedpeft.cli import main

if __name__ == "__main__":
    sys.exit(main())
