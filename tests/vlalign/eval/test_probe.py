"""Compositional probe: exact accuracy on hand-built embeddings, and pairs from the Karpathy JSON."""

from __future__ import annotations

import pytest
import torch

from vlalign.eval.probe import compositional_accuracy, compositional_pairs, compositional_probe

# 2-d embeddings: axis 0 = "colour red", axis 1 = "shape circle".
IMAGE = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])


def test_accuracy_is_exact_per_attribute() -> None:
    true = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    swapped = torch.tensor([[0.1, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # pair 3: the swap is closer
    metrics = compositional_accuracy(IMAGE, true, swapped, ["colour", "colour", "shape", "shape"])
    assert metrics == {
        "compositional_accuracy": 0.75,
        "compositional_accuracy/colour": 1.0,
        "compositional_accuracy/shape": 0.5,
    }


def test_a_model_blind_to_the_swap_scores_zero_not_half() -> None:
    # identical text embeddings for the true and the swapped caption: ties count against the model
    text = torch.tensor([[1.0, 1.0]] * 4)
    metrics = compositional_accuracy(IMAGE, text, text.clone(), ["colour"] * 4)
    assert metrics["compositional_accuracy"] == 0.0


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="shape"):
        compositional_accuracy(IMAGE, IMAGE[:3], IMAGE, ["colour"] * 4)
    with pytest.raises(ValueError, match="one attribute per pair"):
        compositional_accuracy(IMAGE, IMAGE, IMAGE, ["colour"])


def _karpathy() -> dict:
    attributes = {"colour": "red", "shape": "circle", "size": "small", "position": "left", "count": 1}
    images = [
        {"filename": f"{i:06d}.png", "split": "test" if i < 4 else "train", "attributes": dict(attributes)}
        for i in range(6)
    ]
    return {"images": images}


def test_pairs_differ_in_exactly_the_swapped_attribute() -> None:
    paths = {f"{i:06d}.png": (f"/img/{i:06d}.png", "/img") for i in range(6)}
    del paths["000002.png"]  # e.g. quarantined: skipped
    pairs = compositional_pairs(_karpathy(), paths, split="test", seed=0)
    assert [p[0] for p in pairs] == ["/img/000000.png", "/img/000001.png", "/img/000003.png"]
    assert [p[3] for p in pairs] == ["colour", "shape", "position"]
    assert {p[4] for p in pairs} == {"/img"}
    for _, true, swapped, which, _ in pairs:
        assert true != swapped
        assert len(true.split()) == len(swapped.split()) or which == "position"
    colour_true, colour_swapped = pairs[0][1], pairs[0][2]
    assert "red" in colour_true and "red" not in colour_swapped
    assert pairs == compositional_pairs(_karpathy(), paths, split="test", seed=0)  # deterministic


def test_corpus_without_attributes_gives_no_pairs_and_the_probe_is_skipped() -> None:
    karpathy = {"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}
    assert compositional_pairs(karpathy, {"a.jpg": ("/a.jpg", "/")}) == []
    assert compositional_pairs({}, {}) == []
    assert compositional_probe(model=None, cfg=None, pairs=[]) == {}
