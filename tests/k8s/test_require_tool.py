"""The rule for tests that need an external tool (tests/shared.py): run with it, skip without it, fail without it
under CI, so that a CI machine lacking kubectl cannot pass by skipping the kustomize checks."""

from __future__ import annotations

import stat

import pytest
from shared import missing_tool, require_tool, under_ci

WHY = "the kustomize builds are not checked"


@pytest.fixture()
def bin_dir(tmp_path):
    """A PATH folder holding an executable ``kubectl`` and a non-executable ``kustomize``."""
    tool = tmp_path / "kubectl"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "kustomize").write_text("not executable")
    return tmp_path


@pytest.mark.parametrize("value,expected", [
    (None, False), ("", False), ("false", False), ("False", False), ("0", False), (" 0 ", False),
    ("true", True), ("1", True), ("yes", True), ("TRUE", True),
])
def test_under_ci(value, expected):
    env = {} if value is None else {"CI": value}
    assert under_ci(env) is expected


@pytest.mark.parametrize("ci", [None, "true"])
def test_a_tool_on_the_path_runs(bin_dir, ci):
    env = {"PATH": str(bin_dir), **({"CI": ci} if ci else {})}
    assert missing_tool("kubectl", WHY, env) is None


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_a_missing_tool_skips_outside_ci(bin_dir, ci):
    env = {"PATH": str(bin_dir), **({"CI": ci} if ci is not None else {})}
    action, reason = missing_tool("helm", WHY, env)
    assert action == "skip" and reason == f"helm is not on the PATH: {WHY}"
    assert missing_tool("kustomize", WHY, env)[0] == "skip"  # present but not executable counts as missing


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_tool_fails_under_ci(bin_dir, ci):
    action, message = missing_tool("helm", WHY, {"PATH": str(bin_dir), "CI": ci})
    assert action == "fail" and message.startswith("helm is required under CI: ") and WHY in message


def test_require_tool_skips_or_fails(bin_dir, monkeypatch):
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CI", raising=False)
    assert require_tool("kubectl", WHY) == str(bin_dir / "kubectl")
    with pytest.raises(pytest.skip.Exception, match="helm is not on the PATH"):
        require_tool("helm", WHY)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="helm is required under CI: "):
        require_tool("helm", WHY)
