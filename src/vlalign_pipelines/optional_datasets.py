"""Kedro datasets for optional inputs: absent files load as an empty value instead of failing the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

log = logging.getLogger(__name__)


class OptionalJSONDataset(AbstractDataset[None, dict[str, Any]]):
    """A read-only JSON file that loads as ``{}`` (with a warning) when it does not exist.

    Used for ``probe_source``: the per-image attributes of the built-in dataset, which the
    compositional probe needs. In an environment without that file (real datasets) the probe is
    skipped instead of failing the evaluation. A file that exists but is not valid JSON still fails.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        if not self._filepath.is_file():
            log.warning("%s does not exist; loading it as {} (the step that needs it is skipped).", self._filepath)
            return {}
        try:
            return json.loads(self._filepath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{self._filepath}: not valid JSON ({exc}).") from exc

    def save(self, data: dict[str, Any]) -> None:
        raise DatasetError("OptionalJSONDataset is read-only.")

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
