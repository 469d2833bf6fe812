"""Merging refuses checkpoints of different architectures or without a shared init; soups over fine-tunes of one
init: exact endpoints, the uniform average, the greedy rule (keep an ingredient only if validation does not drop).
The lineage checks run on checkpoints written by the real training loop."""

from __future__ import annotations

import copy

import pytest
import torch

from vlalign.errors import IncompatibleCheckpointsError
from vlalign.merge import check_mergeable, greedy_soup, soup_checkpoint, uniform_soup
from vlalign.merge.checks import architecture_signature, final_weights, start_weights
from vlalign.merge.sweep import merged_checkpoint, sweep_beta
from vlalign.models import get_model_config
from vlalign.train import CheckpointStore, StageConfig, train_stage

from shared import TINY, make_manifest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A parent stage from fresh weights, three 1-step fine-tunes of it, and an unrelated fresh stage."""
    tmp = tmp_path_factory.mktemp("stages")
    manifest = make_manifest(tmp / "images")
    cfg = get_model_config("tiny-vit-bert", **TINY)

    def stage(name, seed, init=None, lr=1e-3):
        st = StageConfig(name=name, max_steps=1, batch_size=8, lr=lr, warmup_steps=0, checkpoint_every=0,
                         caption_langs=["en"], device="cpu", seed=seed)
        return train_stage(cfg, st, manifest, init, CheckpointStore(tmp / name))

    parent = stage("parent", 0)
    fines = [stage(f"ft{k}", 10 + k, init=parent, lr=1e-3 * (k + 1)) for k in range(3)]
    return {"parent": parent, "fines": fines, "twin": stage("twin", 0), "other": stage("other", 1)}


def test_the_loop_records_where_each_stage_started(trained) -> None:
    parent, fines = trained["parent"], trained["fines"]
    assert start_weights(parent) == parent["start_weights_sha256"] and parent["inputs"]["init_weights_sha256"] is None
    assert all(start_weights(f) == final_weights(parent) for f in fines)  # a fine-tune started from parent's weights
    assert start_weights(trained["twin"]) == start_weights(parent)  # same seed, same fresh weights
    assert start_weights(trained["other"]) != start_weights(parent)


def test_related_checkpoints_merge(trained) -> None:
    parent, fines = trained["parent"], trained["fines"]
    check_mergeable([parent, fines[0]], ["parent", "ft0"])  # a stage and its fine-tune (WiSE-FT, SPHINX)
    check_mergeable(fines, ["ft0", "ft1", "ft2"])  # fine-tunes of one init (soups)
    check_mergeable([parent, trained["twin"]], ["parent", "twin"])  # the same fresh init (same seed)
    check_mergeable([parent, parent], ["a", "a"])


def test_unrelated_or_foreign_checkpoints_are_refused(trained) -> None:
    parent, other = trained["parent"], trained["other"]
    with pytest.raises(IncompatibleCheckpointsError, match="cannot merge parent and other: they do not share an "
                       "initialisation: parent started from weights [0-9a-f]{12} and other from [0-9a-f]{12}"):
        check_mergeable([parent, other], ["parent", "other"])
    with pytest.raises(IncompatibleCheckpointsError, match="cannot merge ft0 and other"):
        soup_checkpoint([trained["fines"][0], other], ["ft0", "other"])
    with pytest.raises(IncompatibleCheckpointsError, match="do not share an initialisation"):
        merged_checkpoint(parent, other, 0.5, names=("parent", "other"))
    with pytest.raises(IncompatibleCheckpointsError, match="do not share"):  # refused before any scoring
        sweep_beta(parent, other, [0.0, 1.0], score=lambda c: pytest.fail("scored an unmergeable pair"))
    legacy = [copy.copy(parent), copy.copy(other)]
    for ckpt in legacy:
        ckpt.pop("start_weights_sha256")
    with pytest.raises(IncompatibleCheckpointsError, match="neither records the weights it started from"):
        check_mergeable(legacy, ["a", "b"])
    foreign = copy.deepcopy(trained["fines"][1])
    foreign["model_config"]["image"]["timm_name"] = "vit_small_patch16_224"
    with pytest.raises(IncompatibleCheckpointsError, match=r"different architectures \(model_config.image.timm_name is "
                       r"'vit_tiny_patch16_224' in ft0 but 'vit_small_patch16_224' in ft1\)"):
        check_mergeable([trained["fines"][0], foreign], ["ft0", "ft1"])
    renamed = copy.deepcopy(trained["fines"][1])
    renamed["model_config"].update(name="other-name", init_temperature=0.05)  # not architecture
    check_mergeable([trained["fines"][0], renamed], ["ft0", "ft1"])
    assert "image.timm_name" in architecture_signature(parent["model_config"])


def test_beta_endpoints_are_exact(trained) -> None:
    parent, ft = trained["parent"], trained["fines"][0]
    for beta, expected in ((1.0, parent), (0.0, ft)):
        merged = merged_checkpoint(parent, ft, beta, names=("parent", "ft0"))
        assert all(torch.equal(merged["model"][k], v) for k, v in expected["model"].items())
        assert merged["merge"] == {"beta": beta, "sources": ["parent", "ft0"]} and merged["optimizer"] is None


def test_uniform_soup_is_the_average_and_one_ingredient_is_itself(trained) -> None:
    fines = trained["fines"]
    names = ["ft0", "ft1", "ft2"]
    result = uniform_soup(fines, names, score=lambda c: 0.5)
    for key, value in fines[0]["model"].items():
        if value.is_floating_point():
            mean = sum(f["model"][key].double() for f in fines) / 3
            assert torch.allclose(result.checkpoint["model"][key].double(), mean, atol=1e-7), key
        else:
            assert torch.equal(result.checkpoint["model"][key], value)
    assert result.ingredients == names and result.checkpoint["merge"] == {"soup": "uniform", "sources": names}
    single = soup_checkpoint(fines[:1], ["ft0"])
    assert all(torch.equal(single["model"][k], v) for k, v in fines[0]["model"].items())
    same = soup_checkpoint([fines[1]] * 3, ["a", "b", "c"])
    assert all(torch.equal(same["model"][k], v) for k, v in fines[1]["model"].items())


def _distance_score(target: dict[str, torch.Tensor]):
    """A validation score: minus the distance of the soup's weights to ``target`` (higher is better)."""
    def score(ckpt: dict) -> float:
        return -float(sum(((ckpt["model"][k].double() - v.double()) ** 2).sum()
                          for k, v in target.items() if v.is_floating_point()))
    return score


def test_greedy_soup_adds_an_ingredient_only_if_validation_does_not_drop(trained) -> None:
    fines, names = trained["fines"], ["ft0", "ft1", "ft2"]
    # target = the average of ft0 and ft2: the best single is one of them, adding the other helps, ft1 hurts
    target = soup_checkpoint([fines[0], fines[2]], ["ft0", "ft2"])["model"]
    score = _distance_score(target)
    own = [score(f) for f in fines]
    result = greedy_soup(fines, names, score)
    assert sorted(result.ingredients) == ["ft0", "ft2"]
    assert [t["name"] for t in result.trace][0] == names[max(range(3), key=lambda i: own[i])]
    assert result.score == pytest.approx(0.0, abs=1e-9) and result.score >= max(own)
    dropped = [t for t in result.trace if not t["kept"]]
    assert [t["name"] for t in dropped] == ["ft1"] and dropped[0]["soup_score"] < result.score
    # when every addition hurts, the greedy soup is exactly the best ingredient
    lonely = greedy_soup(fines, names, _distance_score(fines[1]["model"]))
    assert lonely.ingredients == ["ft1"]
    assert all(torch.equal(lonely.checkpoint["model"][k], v) for k, v in fines[1]["model"].items())
    with pytest.raises(IncompatibleCheckpointsError):
        greedy_soup([fines[0], trained["other"]], ["ft0", "other"], score)
