"""Zero-shot probabilities follow the loss: the sigmoid for a model with a logit bias (SigLIP), the softmax otherwise;
the ECE of each; and the merge plot."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from vlalign.errors import ConfigError
from vlalign.eval.calibration import expected_calibration_error
from vlalign.eval.merge_plot import save_merge_sweep_plot
from vlalign.eval.run import evaluate_zero_shot, zero_shot_probability_kind
from vlalign.eval.zero_shot import zero_shot_classifier
from vlalign.models import build_model, build_tokenizer_for, get_model_config
from vlalign.models.inference import embed_images, embed_texts

from shared import TINY, make_manifest

CLASSES = ["red circle", "red square", "green circle", "green square", "blue circle", "blue square",
           "yellow circle", "yellow square"]
TEMPLATES = ["a {}", "a picture of a {}"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    rows = make_manifest(tmp_path_factory.mktemp("images"))
    rows = rows[(rows["split"] == "train") & (rows["lang"] == "en")].drop_duplicates("image_id")
    return pd.DataFrame({"image_path": rows["image_path"], "image_root": rows["image_root"],
                         "label": [int(i) // 2 for i in rows["image_id"]]}).reset_index(drop=True)


def _direct_probs(model, cfg, images: pd.DataFrame, sigmoid: bool) -> torch.Tensor:
    tokenizer = build_tokenizer_for(cfg)
    prompts = [t.replace("{}", c) for c in CLASSES for t in TEMPLATES]
    classifier = zero_shot_classifier(embed_texts(model, cfg, tokenizer, prompts).view(len(CLASSES), len(TEMPLATES), -1))
    cos = embed_images(model, cfg, images["image_path"].tolist(), images["image_root"].tolist()) @ classifier.T
    with torch.no_grad():
        if sigmoid:
            return torch.sigmoid(model.scale() * cos + model.logit_bias)
        return (model.scale() * cos).softmax(dim=1)


@pytest.mark.parametrize("bias", [None, -10.0])
def test_zero_shot_probabilities_follow_the_models_loss(images, bias) -> None:
    cfg = get_model_config("tiny-vit-bert", **TINY, init_temperature=0.1, init_logit_bias=bias)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    result = evaluate_zero_shot(model, cfg, images, CLASSES, TEMPLATES)
    sigmoid = bias is not None
    assert result["probabilities"] == ("sigmoid" if sigmoid else "softmax")
    probs = _direct_probs(model, cfg, images, sigmoid)
    expected = expected_calibration_error(probs, torch.tensor(images["label"].to_numpy()), normalized=not sigmoid)
    assert result["reliability"]["ece"] == pytest.approx(expected["ece"], abs=1e-6)
    assert result["reliability"]["mean_confidence"] == pytest.approx(float(probs.max(dim=1).values.mean()), abs=1e-6)
    if sigmoid:  # b = -10 at init: SigLIP says "no match" to every class, a confidence near sigmoid(-10 + s*cos)
        assert result["reliability"]["mean_confidence"] < 1e-3
    softmax = evaluate_zero_shot(model, cfg, images, CLASSES, TEMPLATES, probabilities="softmax")
    assert softmax["probabilities"] == "softmax" and softmax["metrics"] == result["metrics"]  # accuracy: cosines


def test_probability_choice_and_errors() -> None:
    plain = build_model(get_model_config("tiny-vit-bert", **TINY))
    assert zero_shot_probability_kind(plain) == "softmax"
    with pytest.raises(ConfigError, match="probabilities=sigmoid needs a model with a learnable logit bias"):
        zero_shot_probability_kind(plain, "sigmoid")
    with pytest.raises(ConfigError, match=r"expected one of \['auto', 'softmax', 'sigmoid'\]"):
        zero_shot_probability_kind(plain, "tanh")


def test_ece_of_independent_probabilities() -> None:
    probs = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.1]])  # rows need not sum to 1 (sigmoids)
    labels = torch.tensor([0, 2])
    data = expected_calibration_error(probs, labels, n_bins=10, normalized=False)
    # sample 0: confidence 0.9, correct; sample 1: confidence 0.3 (class 1), wrong
    assert data["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)
    with pytest.raises(ValueError, match="not a probability distribution"):
        expected_calibration_error(probs, labels)
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*pass sigmoid\(logits\)"):
        expected_calibration_error(probs * 3, labels, normalized=False)


def test_merge_plot_marks_endpoints_and_soups(tmp_path) -> None:
    sweep = {"theta1": "real", "theta2": "synthetic", "metric": "mean_recall", "best_beta": 0.5,
             "scores": [{"beta": b, "score": s, "std": 0.01} for b, s in ((0.0, 0.3), (0.5, 0.4), (1.0, 0.35))]}
    soups = [{"kind": "uniform", "score": 0.38, "ingredients": ["a", "b", "c"]},
             {"kind": "greedy", "score": 0.41, "std": 0.02, "ingredients": ["a", "c"]}]
    path = save_merge_sweep_plot(tmp_path / "plot.png", sweep, soups, [{"name": "a", "score": 0.36}])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    from vlalign.eval.merge_plot import merge_sweep_figure

    labels = merge_sweep_figure(sweep, soups).axes[0].get_legend_handles_labels()[1]
    assert any(l.startswith("endpoint beta=1: real") for l in labels)
    assert any(l.startswith("endpoint beta=0: synthetic") for l in labels)
    assert any(l.startswith("uniform soup (a, b, c)") for l in labels) and any("greedy soup" in l for l in labels)
    assert "chosen beta=0.5" in labels
