"""ITM re-ranking: the per-image K/V cache gives the uncached scores, ranks follow the retrieval tie rule, and the
re-ranked metrics come from the ITM scores of the top k_test only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlalign.errors import ConfigError
from vlalign.eval.rerank import (
    RerankConfig, RerankInputs, candidate_lists, evaluate_rerank, pair_scores_cached, pair_scores_uncached,
    ranks_from_scores, rerank_inputs, rerank_score_matrices, top_k_indices,
)
from vlalign.eval.retrieval import recall_from_ranks, retrieval_metrics, retrieval_ranks
from vlalign.eval.run import retrieval_inputs
from vlalign.models import build_model, build_tokenizer_for, get_model_config
from vlalign.models.inference import embed_images, embed_texts

from shared import FP32_EPS, TINY, assert_within, make_manifest, recall_bounds, rounding_tolerance


@pytest.fixture(scope="module")
def model():
    """A fusion model whose ITM scores spread like a trained one's. With the BERT init (N(0, 0.02)) an untrained
    model scores every pair within 0.005 of each other, so near-ties are everywhere; weights of std 0.2 in the
    fusion layers and the ITM head spread the scores over several units."""
    torch.manual_seed(0)
    cfg = get_model_config("tiny-vit-bert", **TINY, arch="fusion", arch_options={"fusion_layers": 2, "decoder_layers": 0})
    model = build_model(cfg).eval()
    with torch.no_grad():
        for param in [*model.fusion.parameters(), *model.itm_head.parameters()]:
            if param.ndim == 2:
                param.normal_(0.0, 0.2)
    return model


@torch.no_grad()
def itm_tolerance(model, image_tokens: int, text_length: int) -> float:
    """Float32 rounding bound (:func:`shared.rounding_tolerance`) on the difference between two evaluations of the
    same ITM log-odds, e.g. the cached and the uncached path (other matrix shapes, so other kernels and summation
    orders). The log-odds are ``(w1 - w0) . h + (b1 - b0)`` with h the last fusion layer's LayerNorm output, so
    ``|log-odds - bias| <= ||w1 - w0|| * (max|gamma| * sqrt(H) + ||beta||)``: that is the scale. Each fusion layer
    runs about 10 products in series (q/k/v, scores, attention x V and output of both attentions, the MLP's two),
    whose longest reduction is max(MLP width, image width, image tokens, text length)."""
    head = model.itm_head.weight  # (2, H)
    norm = model.fusion.layers[-1].norm3
    width = head.shape[1]
    scale = float((head[1] - head[0]).norm() * (norm.weight.abs().max() * math.sqrt(width) + norm.bias.norm()))
    layer = model.fusion.layers[0]
    longest = max(layer.mlp[0].out_features, layer.cross_attn.kv.in_features, image_tokens, text_length)
    return rounding_tolerance(scale, longest, products_in_series=10 * len(model.fusion.layers))


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
    tol = itm_tolerance(model, inputs.image_tokens.shape[1], inputs.text_tokens.shape[1])
    for batch_size in (4, 7, 64):  # groups larger than a batch (shared K/V), several images per batch (gathered)
        cached = pair_scores_cached(model, inputs.image_tokens, inputs.text_tokens, inputs.text_mask, pairs, batch_size)
        assert float((cached - reference).abs().max()) <= tol, batch_size
    assert float(reference.max() - reference.min()) > 100 * tol  # the tolerance tells pairs apart


def test_ranks_from_scores_follow_the_retrieval_tie_rule() -> None:
    generator = torch.Generator().manual_seed(0)
    # on a 2**-8 grid every score is exact in float32 whatever the product's order (ours and retrieval_ranks'
    # chunks), so the two rankings must agree exactly; unsnapped, a last-bit difference could flip a near-tie
    image = torch.round(F.normalize(torch.randn(7, 4, generator=generator), dim=-1) * 256) / 256
    text = torch.round(F.normalize(torch.randn(20, 4, generator=generator), dim=-1) * 256) / 256
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
    tol = itm_tolerance(model, inputs.image_tokens.shape[1], inputs.text_tokens.shape[1])
    for got, want in ((t2i, t2i_ref), (i2t, i2t_ref)):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)  # the same candidates: both paths select them alike
        assert float((got[finite] - want[finite]).abs().max()) <= tol
    assert (torch.isfinite(i2t).sum(dim=1) == 3).all() and (torch.isfinite(t2i).sum(dim=1) == 3).all()
    sims = inputs.image_emb @ inputs.text_emb.T  # (N, M), the very product candidate_lists takes
    top = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :3]  # (N, 3)
    assert torch.equal(torch.isfinite(i2t), torch.zeros_like(sims, dtype=torch.bool).scatter(1, top, True))


def test_candidate_lists_break_ties_by_index() -> None:
    """Equal ITC scores make the cut in index order (torch.topk may return tied entries in any order, and which
    order depends on the CPU kernel)."""
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_k_indices(scores, 3).tolist() == [[3, 1, 2], [0, 1, 2]]
    assert top_k_indices(scores, 10).shape == (2, 6)
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]), dim=-1)
    i2t, t2i = candidate_lists(image, text, k_test=2)
    assert i2t.tolist() == [[2, 4], [0, 1]]  # texts 2 and 4 tie for image 0; 1 and 3 for image 1 (second place)
    assert t2i[1].tolist() == [0, 1] and t2i[3].tolist() == [0, 1]  # texts 1 and 3 score both images alike


def test_recall_bounds_contain_every_perturbation_within_the_margin() -> None:
    """The helper the metric comparisons rely on: scores moved by at most ``margin`` give metrics inside the
    bounds, margin 0 without ties pins them, and a larger move can leave them."""
    generator = torch.Generator().manual_seed(0)
    text_to_image = torch.arange(12) % 5  # (12,) 5 images, 2-3 captions each
    t2i = torch.randn(12, 5, generator=generator).double()  # (M, N)
    i2t = torch.randn(5, 12, generator=generator).double()  # (N, M)
    exact = recall_from_ranks(ranks_from_scores(t2i, i2t, text_to_image))
    low, high = recall_bounds(t2i, i2t, text_to_image, margin=0.0)
    assert low == high == exact
    margin = 0.2
    bounds = recall_bounds(t2i, i2t, text_to_image, margin)
    outside = 0
    for trial in range(200):
        for spread, within in ((margin, True), (3.0, False)):
            noise = lambda shape: (torch.rand(shape, generator=generator).double() * 2 - 1) * spread  # noqa: E731
            moved = recall_from_ranks(ranks_from_scores(t2i + noise(t2i.shape), i2t + noise(i2t.shape), text_to_image))
            if within:
                assert_within(moved, bounds)
            else:
                outside += any(not bounds[0][k] <= v <= bounds[1][k] for k, v in moved.items())
    assert outside > 0
    assert bounds[0] != bounds[1]  # 0.2 leaves some near-ties open


def test_evaluate_rerank_reports_both_metric_sets(model, tmp_path) -> None:
    manifest = make_manifest(tmp_path / "images")
    cfg = model.config
    result = evaluate_rerank(model, cfg, manifest, split="train", lang="en", config=RerankConfig(k_test=4, batch_size=8))
    assert (result["n_images"], result["n_captions"], result["k_test"]) == (16, 32, 4)
    assert set(result["metrics"]) == set(result["itc_metrics"]) == set(result["chance"])
    from vlalign.eval.run import evaluate_retrieval

    plain = evaluate_retrieval(model, cfg, manifest, split="train", lang="en")
    uncached = evaluate_rerank(model, cfg, manifest, "train", "en", RerankConfig(k_test=4, batch_size=8, cache=False))
    # Each metric set is compared through the scores it comes from: the two paths sum in other orders, so their
    # scores may differ in the last bits on another CPU and flip a near-tie (issue 16: the cached and uncached
    # metrics differed on an AVX-512/AMX machine). The scores must agree to the rounding tolerance, and each
    # path's metrics must lie within what scores that close can give (equal metrics where the scores are equal).
    paths, roots, captions, text_to_image = retrieval_inputs(manifest, "train", "en")
    inputs = rerank_inputs(model, cfg, paths, roots, captions)  # what evaluate_rerank computes, bit for bit
    t2i, i2t, _ = rerank_score_matrices(model, inputs, 4, 8, cache=True)
    t2i_ref, i2t_ref, _ = rerank_score_matrices(model, inputs, 4, 8, cache=False)
    assert result["metrics"] == recall_from_ranks(ranks_from_scores(t2i, i2t, text_to_image))  # same path, same bits
    for got, want in ((t2i, t2i_ref), (i2t, i2t_ref)):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))  # the same candidates re-scored
    gap = max(float((t2i - t2i_ref)[torch.isfinite(t2i_ref)].abs().max()),
              float((i2t - i2t_ref)[torch.isfinite(i2t_ref)].abs().max()))  # the largest score difference
    assert gap <= itm_tolerance(model, inputs.image_tokens.shape[1], inputs.text_tokens.shape[1])
    assert_within(uncached["metrics"], recall_bounds(t2i, i2t, text_to_image, gap))
    if gap == 0.0:
        assert uncached["metrics"] == result["metrics"]
    # ITC-only is the plain retrieval: the same model, embedded by rerank_inputs or by embed_images/embed_texts
    image = embed_images(model, cfg, paths, roots)  # (N, D), as evaluate_retrieval embeds
    text = embed_texts(model, cfg, build_tokenizer_for(cfg), captions)  # (M, D)
    # unit embeddings through the same towers, maybe in other batch shapes: the towers' rounding bound (ViT and BERT
    # layers of about 10 products in series, longest reduction the patch embedding's 3 x 8 x 8 = 192)
    depth = len(model.image_tower.blocks) + model.text_tower.transformer.config.num_hidden_layers + 1
    emb_gap = max(float((image - inputs.image_emb).abs().max()), float((text - inputs.text_emb).abs().max()))
    assert emb_gap <= rounding_tolerance(1.0, 192, 10 * depth)
    # every cosine of unit vectors is within D * eps of exact whichever product computes it (the library's chunks,
    # candidate_lists' (N, M) product, ours); the measured gap goes through two products: 4 D eps covers them all
    products = 4 * image.shape[1] * FP32_EPS
    margin = float((text @ image.T - inputs.text_emb @ inputs.image_emb.T).abs().max()) + products
    itc_bounds = recall_bounds(text @ image.T, image @ text.T, text_to_image, margin)
    assert_within(plain["metrics"], itc_bounds)
    assert_within(result["itc_metrics"], itc_bounds)
    if emb_gap == 0.0:
        assert result["itc_metrics"] == plain["metrics"]  # identical embeddings, the same ranking code
    # k_test = 1: only the ITC top-1 is kept (ties to the lower index), so every recall@k is its recall@1, and that
    # is the ITC recall@1 up to ITC near-ties (the candidates come from another product than retrieval_ranks')
    one = evaluate_rerank(model, cfg, manifest, "train", "en", RerankConfig(k_test=1))
    low, high = recall_bounds(inputs.text_emb @ inputs.image_emb.T, inputs.image_emb @ inputs.text_emb.T, text_to_image,
                              products)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1"):
        assert one["metrics"][key.replace("@1", "@10")] == one["metrics"][key]  # one ranking, read at 1 and 10
        assert low[key] <= one["metrics"][key] <= high[key] and low[key] <= one["itc_metrics"][key] <= high[key]
    with pytest.raises(ConfigError, match="ITM head"):
        evaluate_rerank(build_model(get_model_config("tiny-vit-bert", **TINY)), get_model_config("tiny-vit-bert", **TINY),
                        manifest, "train", "en")
    with pytest.raises(ConfigError, match="unknown key"):
        RerankConfig.from_dict({"k": 3})


def test_itm_plus_itc_adds_each_candidates_itc_logit(model, tmp_path) -> None:
    """score itm+itc (BLIP/BLIP-2 in LAVIS) ranks the re-scored candidates by ITM log-odds + ITC logit (cosine times
    the learned logit scale); itm (ALBEF) by the log-odds alone; the same candidates either way."""
    manifest = make_manifest(tmp_path / "images")
    paths, roots, captions, text_to_image = retrieval_inputs(manifest, "train", "en")
    inputs = rerank_inputs(model, model.config, paths, roots, captions)
    t2i, i2t, fused = rerank_score_matrices(model, inputs, 4, 8, score="itm")
    t2i_sum, i2t_sum, fused_sum = rerank_score_matrices(model, inputs, 4, 8, score="itm+itc")
    assert fused == fused_sum and torch.equal(torch.isfinite(i2t), torch.isfinite(i2t_sum))
    scale = float(model.logit_scale.detach().exp())
    assert scale != 1.0  # the learned scale, not a plain cosine
    logits = scale * (inputs.image_emb @ inputs.text_emb.T)  # (N, M) computed independently of the library's pairs
    finite = torch.isfinite(i2t)
    torch.testing.assert_close(i2t_sum[finite], (i2t + logits)[finite], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(t2i_sum[finite.T], (t2i + logits.T)[finite.T], rtol=0, atol=1e-5 * scale)
    result = evaluate_rerank(model, model.config, manifest, "train", "en", RerankConfig(k_test=4, batch_size=8))
    assert result["score"] == "itm+itc"
    assert result["metrics"] == recall_from_ranks(ranks_from_scores(t2i_sum, i2t_sum, text_to_image))
    with pytest.raises(ConfigError, match=r"evaluation.rerank.score='itc'; expected one of \['itm\+itc', 'itm'\]"):
        RerankConfig(score="itc")


def test_itm_weight_is_chosen_on_the_validation_split(model, tmp_path) -> None:
    """itm_weight: validation scores every weight of the grid on the val split's pairs and evaluates the asked split
    with the best one (ties: the larger); a fixed weight 0 leaves the ITC order of the candidates."""
    from vlalign.eval.rerank import WEIGHT_GRID, choose_itm_weight, logit_scale_of

    manifest = make_manifest(tmp_path / "images")
    manifest.loc[manifest["image_id"].astype(str).isin([str(i) for i in range(8)]), "split"] = "val"  # 8 val images
    config = RerankConfig(k_test=4, batch_size=8)
    weight, source, scores = choose_itm_weight(model, model.config, manifest, "en", config)
    assert source.startswith("validation") and set(scores) == {str(w) for w in WEIGHT_GRID}
    paths, roots, captions, text_to_image = retrieval_inputs(manifest, "val", "en")
    inputs = rerank_inputs(model, model.config, paths, roots, captions)
    for w in WEIGHT_GRID:  # each grid score is the mean recall of rerank_score_matrices at that weight (to rounding)
        t2i, i2t, _ = rerank_score_matrices(model, inputs, 4, 8, score="itm+itc", itm_weight=w)
        direct = recall_from_ranks(ranks_from_scores(t2i, i2t, text_to_image))["mean_recall"]
        assert abs(direct - scores[str(w)]) <= 1.0 / len(captions) + 1e-9
    assert scores[str(weight)] == max(scores.values())
    assert weight == max(w for w in WEIGHT_GRID if scores[str(w)] == max(scores.values()))
    result = evaluate_rerank(model, model.config, manifest, "train", "en", config)
    assert (result["itm_weight"], result["itm_weight_scores"]) == (weight, scores)
    t2i, i2t, _ = rerank_score_matrices(model, inputs=rerank_inputs(model, model.config, *retrieval_inputs(
        manifest, "train", "en")[:3]), k_test=4, batch_size=8, score="itm+itc", itm_weight=weight)
    assert result["metrics"] == recall_from_ranks(ranks_from_scores(t2i, i2t, retrieval_inputs(manifest, "train", "en")[3]))
    zero = evaluate_rerank(model, model.config, manifest, "train", "en", RerankConfig(k_test=4, itm_weight=0))
    assert zero["itm_weight"] == 0.0 and zero["itm_weight_from"] == "config"
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1"):  # w = 0: the candidates keep their ITC order
        assert abs(zero["metrics"][key] - zero["itc_metrics"][key]) <= 0.1
    assert logit_scale_of(model) > 1.0
    with pytest.raises(ConfigError, match="itm_weight=-1; expected a number >= 0 or 'validation'"):
        RerankConfig(itm_weight=-1)
