"""Expected calibration error and the reliability diagram."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from vlalign.eval.calibration import expected_calibration_error, reliability_diagram


def test_ece_by_hand():
    # 4 bins over [0, 1]: (0, .25], (.25, .5], (.5, .75], (.75, 1].
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 0, 1])
    # confidences 0.9 (right), 0.8 (wrong: predicts 1), 0.6 (right), 0.7 (right)
    data = expected_calibration_error(probs, labels, n_bins=4)
    assert data["bin_count"] == [0, 0, 2, 2]
    assert data["bin_confidence"][2:] == pytest.approx([0.65, 0.85])
    assert data["bin_accuracy"][2:] == pytest.approx([1.0, 0.5])
    assert data["bin_edges"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # ECE = 2/4 * |1 - 0.65| + 2/4 * |0.5 - 0.85| = 0.35
    assert data["ece"] == pytest.approx(0.35)
    assert data["accuracy"] == pytest.approx(0.75)
    assert data["mean_confidence"] == pytest.approx(0.75)


def test_bin_edges_are_right_closed():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    data = expected_calibration_error(probs, torch.tensor([0, 0]), n_bins=2)
    assert data["bin_count"] == [1, 1]  # 0.5 in (0, 0.5], 1.0 in (0.5, 1]
    # bin 0: confidence 0.5, accuracy 1 (argmax takes the first tied class); bin 1: perfect.
    assert data["ece"] == pytest.approx(0.5 * 0.5)


def test_confident_and_always_right_is_perfectly_calibrated():
    probs = torch.nn.functional.one_hot(torch.tensor([2, 0, 1]), 3).float()
    data = expected_calibration_error(probs, torch.tensor([2, 0, 1]))
    assert data["ece"] == 0.0
    assert data["n_bins"] == 15 and sum(data["bin_count"]) == 3 and data["bin_count"][-1] == 3


def test_overconfident_model_has_positive_ece():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=gen)
    probs = torch.softmax(10 * torch.randn(500, 10, generator=gen), dim=1)  # confident, random guesses
    data = expected_calibration_error(probs, labels)
    assert data["mean_confidence"] > 0.8 and data["accuracy"] < 0.2
    # |sum_b w_b (conf_b - acc_b)| <= ECE: the binned gaps cannot cancel out.
    assert data["ece"] >= data["mean_confidence"] - data["accuracy"] - 1e-12
    assert data["ece"] > 0.6


def test_logits_are_rejected():
    with pytest.raises(ValueError, match="row 0 is not a probability distribution.*softmax"):
        expected_calibration_error(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))


def test_reliability_diagram_writes_png(tmp_path):
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    data = expected_calibration_error(probs, torch.tensor([0, 0, 0, 1]), n_bins=4)
    path = reliability_diagram(data, tmp_path / "sub" / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000


def test_reliability_diagram_rejects_foreign_dict(tmp_path):
    with pytest.raises(ValueError, match="expected_calibration_error"):
        reliability_diagram({"ece": 0.1}, tmp_path / "x.png")


def test_metrics_import_and_run_without_matplotlib():
    # matplotlib is an optional ("pipelines") dependency: only the plotting functions may need it.
    code = textwrap.dedent(
        """
        import sys
        class BlockMatplotlib:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ImportError("matplotlib blocked for this test")
        sys.meta_path.insert(0, BlockMatplotlib())
        import torch
        import vlalign.eval as E
        data = E.expected_calibration_error(torch.tensor([[0.75, 0.25]]), torch.tensor([0]))
        assert abs(data["ece"] - 0.25) < 1e-9, data
        assert "matplotlib" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
