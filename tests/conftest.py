"""Makes the shared test helpers (tests/shared.py) importable from every test folder; fixtures for external tools."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl's path. Without it the test skips, or fails under CI (tests/shared.py: missing_tool)."""
    from shared import require_tool  # imported here: shared.py imports pandas, which most test runs do not need

    return require_tool("kubectl", "the kustomize builds of k8s/ are not checked; the base files are still validated "
                                   "one by one")
