"""Makes the shared test helpers (tests/shared.py) importable from every test folder, and starts the test process
in the default reproducibility mode (portable) before anything imports torch, as `vlalign` and `kedro run` do."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from vlalign import reproducibility  # noqa: E402 - must run before torch is imported

reproducibility.activate(reproducibility.DEFAULT_MODE)
