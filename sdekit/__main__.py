"""``python -m sdekit``: the ``sdekit`` command line (also what ``accelerate launch -m sdekit`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
