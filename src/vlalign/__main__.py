"""``python -m vlalign ...`` (and ``torchrun -m vlalign train ...``) runs the ``vlalign`` command."""

import sys

from vlalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
