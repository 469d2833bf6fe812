"""ITM re-ranking: the per-image K/V cache gives the uncached scores, ranks follow the retrieval tie rule, and the
re-ranked metrics come from the ITM scores of the top k_test only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlalign.errors import ConfigError
from vlalign.eval.rerank import (
    RerankConfig, RerankInputs, evaluate_rerank, pair_scores_cached, pair_scores_uncached, ranks_from_scores,
    rerank_score_matrices,
)
from vlalign.eval.retrieval import retrieval_metrics, retrieval_ranks
from vlalign.models import build_model, get_model_config

from shared import TINY, make_manifest


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = get_model_config("tiny-vit-bert", **TINY, arch="fusion", arch_options={"fusion_layers": 2, "decoder_layers": 0})
    return build_model(cfg).eval()


def _inputs(model, n_images=6, n_texts=15, seed=0) -> RerankInputs:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (n_texts, 7), generator=generator)
    ids[:, 0] = 2
    lengths = torch.randint(3, 8, (n_texts,), generator=generator)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        tokens, pooled = model.image_outputs(torch.randn(n_images, 3, 32, 32, generator=generator))
        states, text_pooled = model.text_outputs(ids, mask)
    return RerankInputs(tokens, F.normalize(model.image_proj(pooled), dim=-1).detach(), states, mask,
                        F.normalize(model.text_proj(text_pooled), dim=-1).detach())


def test_cached_scores_equal_uncached(model) -> None:
    inputs = _inputs(model)
    generator = torch.Generator().manual_seed(1)
    pairs = torch.cat([
        torch.stack([torch.full((11,), 2), torch.randint(0, 15, (11,), generator=generator)], dim=1),  # one image, many
        torch.stack([torch.randint(0, 6, (9,), generator=generator), torch.randint(0, 15, (9,), generator=generator)], 1),
    ])[torch.randperm(20, generator=generator)]
    reference = pair_scores_uncached(model, inputs.image_tokens, inputs.text_tokens, inputs.text_mask, pairs, 4)
    for batch_size in (4, 7, 64):  # groups larger than a batch (shared K/V), several images per batch (gathered)
        cached = pair_scores_cached(model, inputs.image_tokens, inputs.text_tokens, inputs.text_mask, pairs, batch_size)
        assert torch.allclose(cached, reference, atol=1e-5), batch_size
    assert reference.std() > 0  # the scores differ from pair to pair


def test_ranks_from_scores_follow_the_retrieval_tie_rule() -> None:
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(7, 4, generator=generator), dim=-1)
    text = F.normalize(torch.randn(20, 4, generator=generator), dim=-1)
    text[5] = text[4]  # exact ties
    image[3] = image[2]
    text_to_image = torch.randint(0, 7, (20,), generator=generator)
    text_to_image[:7] = torch.arange(7)
    want = retrieval_ranks(image, text, text_to_image)
    got = ranks_from_scores(text @ image.T, image @ text.T, text_to_image)
    assert torch.equal(got.image_retrieval, want.image_retrieval)
    assert torch.equal(got.text_retrieval, want.text_retrieval)


def test_rerank_matrices_cached_equal_uncached_and_only_the_top_k_are_rescored(model) -> None:
    inputs = _inputs(model)
    t2i, i2t, fused = rerank_score_matrices(model, inputs, k_test=3, batch_size=5, cache=True)
    t2i_ref, i2t_ref, fused_ref = rerank_score_matrices(model, inputs, k_test=3, batch_size=5, cache=False)
    assert fused_ref == 6 * 3 + 15 * 3 and fused < fused_ref  # pairs found in both directions are fused once
    for got, want in ((t2i, t2i_ref), (i2t, i2t_ref)):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        assert torch.allclose(got[finite], want[finite], atol=1e-5)
    assert (torch.isfinite(i2t).sum(dim=1) == 3).all() and (torch.isfinite(t2i).sum(dim=1) == 3).all()
    sims = inputs.image_emb @ inputs.text_emb.T
    assert torch.equal(torch.isfinite(i2t), torch.zeros_like(sims, dtype=torch.bool).scatter(1, sims.topk(3).indices, True))


def test_evaluate_rerank_reports_both_metric_sets(model, tmp_path) -> None:
    manifest = make_manifest(tmp_path / "images")
    cfg = model.config
    result = evaluate_rerank(model, cfg, manifest, split="train", lang="en", config=RerankConfig(k_test=4, batch_size=8))
    assert (result["n_images"], result["n_captions"], result["k_test"]) == (16, 32, 4)
    assert set(result["metrics"]) == set(result["itc_metrics"]) == set(result["chance"])
    from vlalign.eval.run import evaluate_retrieval

    plain = evaluate_retrieval(model, cfg, manifest, split="train", lang="en")
    assert result["itc_metrics"] == pytest.approx(plain["metrics"], abs=1e-9)  # ITC-only is the plain retrieval
    uncached = evaluate_rerank(model, cfg, manifest, "train", "en", RerankConfig(k_test=4, batch_size=8, cache=False))
    assert uncached["metrics"] == result["metrics"]
    # k_test = 1: only the ITC top-1 is kept, so every recall@k is the ITC recall@1
    one = evaluate_rerank(model, cfg, manifest, "train", "en", RerankConfig(k_test=1))
    for direction in ("image_retrieval_recall", "text_retrieval_recall"):
        assert one["metrics"][f"{direction}@10"] == one["metrics"][f"{direction}@1"] == one["itc_metrics"][f"{direction}@1"]
    with pytest.raises(ConfigError, match="ITM head"):
        evaluate_rerank(build_model(get_model_config("tiny-vit-bert", **TINY)), get_model_config("tiny-vit-bert", **TINY),
                        manifest, "train", "en")
    with pytest.raises(ConfigError, match="unknown key"):
        RerankConfig.from_dict({"k": 3})
