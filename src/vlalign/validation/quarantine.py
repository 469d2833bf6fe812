"""Split a validated manifest into clean rows and quarantined rows, and enforce the rejection threshold.

A quarantined row keeps every manifest column and gains two columns:

- ``failed_expectations``: the names of every expectation the row failed, joined with ``";"``;
- ``reason``: one human-readable sentence per failure, joined with ``"; "``.

No row is dropped silently: ``len(clean) + len(quarantine) == len(manifest)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from vlalign.errors import ConfigError, ValidationFailedError

#: Columns a quarantine table adds to the manifest columns.
QUARANTINE_COLUMNS = ("failed_expectations", "reason")


@dataclass
class ValidationResult:
    """Outcome of :func:`vlalign.validation.expectations.validate_manifest`."""

    clean: pd.DataFrame  # rows that passed every expectation; the manifest's own columns only
    quarantine: pd.DataFrame  # rows that failed at least one: manifest columns + failed_expectations + reason
    report: dict = field(default_factory=dict)  # JSON-serialisable summary: per-expectation results, counts, GX stats
    success: bool = True  # True when every expectation passed, i.e. nothing was quarantined

    @property
    def rejected_fraction(self) -> float:
        """Fraction of manifest rows that were quarantined (0.0 for an empty manifest)."""
        return float(self.report.get("rejected_fraction", 0.0))


def split_rows(
    manifest: pd.DataFrame, failed: dict[int, list[str]], reasons: dict[int, list[str]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(clean, quarantine)`` from the manifest and its per-row failures.

    Args:
        manifest: the validated table; rows are addressed by position (0..n-1).
        failed: row position -> names of the expectations it failed (only failing rows).
        reasons: row position -> one human sentence per failure, in the same order.
    """
    bad = sorted(failed)
    mask = pd.Series(False, index=range(len(manifest)))
    mask.iloc[bad] = True
    positions = mask.to_numpy()
    clean = manifest.iloc[~positions].reset_index(drop=True)
    quarantine = manifest.iloc[positions].reset_index(drop=True)
    quarantine["failed_expectations"] = [";".join(failed[i]) for i in bad]
    quarantine["reason"] = ["; ".join(reasons[i]) for i in bad]
    return clean, quarantine


def enforce_threshold(
    result: ValidationResult | dict, max_rejected_fraction: float, quarantine_path: str | None
) -> None:
    """Raise :class:`ValidationFailedError` when more than ``max_rejected_fraction`` of the rows were quarantined.

    ``result`` is a :class:`ValidationResult` or just its ``report`` dict (what a pipeline keeps once the
    tables are saved). The message names each failed expectation with its number of failing rows, the
    quarantine file (``quarantine_path``, where the caller saved the quarantine table) and what to do.
    """
    if not 0.0 <= max_rejected_fraction <= 1.0:
        raise ConfigError(
            f"max_rejected_fraction={max_rejected_fraction!r}: expected a fraction between 0 and 1 (e.g. 0.05)."
        )
    report = result.report if isinstance(result, ValidationResult) else result
    missing = [key for key in ("n_rows", "n_quarantined", "rejected_fraction", "expectations") if key not in report]
    if missing:
        raise ConfigError(
            f"enforce_threshold: the report lacks {missing}; pass the ValidationResult (or its .report) "
            "returned by validate_manifest."
        )
    fraction = float(report["rejected_fraction"])
    if fraction <= max_rejected_fraction:
        return
    failures = [
        f"{name}: {info['unexpected_count']} rows"
        for name, info in report["expectations"].items()
        if not info["success"]
    ]
    where = quarantine_path if quarantine_path else "(not saved; pass quarantine_path to keep the rejected rows)"
    raise ValidationFailedError(
        f"Data validation rejected {report['n_quarantined']} of {report['n_rows']} rows "
        f"({fraction:.2%}), more than the allowed {max_rejected_fraction:.2%}. Failed expectations: "
        f"{'; '.join(failures)}. The rejected rows, with the expectations each failed and why, are in the "
        f"quarantine file {where}. Fix the source data (or the loader / paths that produced it) and run again; "
        "raise max_rejected_fraction only if this share of bad rows is acceptable."
    )
