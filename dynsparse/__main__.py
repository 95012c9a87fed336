"""``python -m dynsparse``: the ``dynsparse`` command line."""

import sys

from dynsparse.cli import main

if __name__ == "__main__":
    sys.exit(main())
