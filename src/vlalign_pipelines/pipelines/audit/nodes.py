"""Audit nodes: run `vlalign audit` on the version ``audit.model_uri`` names, keep its report, fail when a check fails."""

from __future__ import annotations

import logging
from typing import Any

from vlalign.tracking.audit import AuditError, audit_config_from_dict, run_audit

log = logging.getLogger(__name__)


def audit_model_version(params: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Audit the version (report logged to it unless ``audit.log_to_registry`` is false); return the report as JSON
    and Markdown. Prints one line per check."""
    report = run_audit(audit_config_from_dict(params, where="audit"))
    for line in report.lines():
        log.info("%s", line)
    return report.to_dict(), report.to_markdown()


def enforce_audit(report: dict[str, Any]) -> None:
    """Fail the run when a check failed (after the report was saved)."""
    if not report["passed"]:
        failed = [c for c in report["checks"] if c["status"] == "fail"]
        raise AuditError(f"the audit of {report['model_uri']} ({report['name']} v{report['version']}) failed "
                         f"{len(failed)} check(s): " + "; ".join(f"{c['name']}: {c['reason']}" for c in failed)[:1500]
                         + " The full report is in the audit_report dataset (audit.md / audit.json).")
