"""Makes the shared test helpers (tests/shared.py) importable from every test folder, starts the test process in the
default reproducibility mode (portable) before anything imports torch, as `vlalign` and `kedro run` do, and holds
fixtures for external tools."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from vlalign import reproducibility  # noqa: E402 - must run before torch is imported

reproducibility.activate(reproducibility.DEFAULT_MODE)


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl's path. Without it the test skips, or fails under CI (tests/shared.py: missing_tool)."""
    from shared import require_tool  # imported here: shared.py imports pandas, which most test runs do not need

    return require_tool("kubectl", "the kustomize builds of k8s/ are not checked; the base files are still validated "
                                   "one by one")
