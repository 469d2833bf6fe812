"""Retrieval with ITM re-ranking (the ALBEF / BLIP ``k_test`` protocol), with a per-image K/V cache.

ITC ranks every candidate; then for each query the top ``k_test`` candidates are re-scored by the ITM head on the
fused pair, and the re-ranked lists give the second set of metrics (both are reported). The ITM score of a pair is
its log-odds of matching, ``logit_match − logit_no_match``; candidates outside the top ``k_test`` score −∞ (ALBEF
fills them with −100), so they rank below every re-scored one.

``score`` decides what ranks the re-scored candidates: ``itm+itc`` (default, as BLIP's and BLIP-2's retrieval
evaluation in LAVIS, which add the ITC similarity to the ITM score) adds the pair's ITC logit, its cosine times the
model's learned logit scale, so both terms are log-odds-like and neither is a tie-breaker of the other; ``itm`` ranks
by the ITM log-odds alone (ALBEF's evaluation). Adding ITC keeps what the contrastive ranking knows when the ITM head
is weak: after the ``blip`` recipe's stage 3 on the built-in data, ITM alone took validation mean recall from 0.201
(ITC) to 0.051 at ``k_test`` 128, and ITM + ITC logit to 0.187.

``itm_weight`` is the weight w of the ITM term in ``w · ITM + ITC``: a number, or ``validation`` (default), which
picks w from :data:`WEIGHT_GRID` (0 included: ITC alone) by the mean recall on the validation split's pairs, then
scores the evaluated split with it, so a head that ranks worse than ITC on held-out pairs gets less say, and the
report shows how much (``itm_weight``, ``itm_weight_scores``). Without a validation split w is 1, recorded as such.

**The per-image K/V cache.** LAVIS scores each query's ``k_test`` candidates by running the fusion layers with the
image tokens repeated ``k_test`` times, so every layer's cross-attention projects the same image to keys and values
again for every candidate, and once more in the other direction. Here the pairs of *both* directions are pooled
(a pair found by both is scored once), grouped by image, and each image's keys and values are computed once per
fusion layer (:meth:`vlalign.models.fusion.FusionModel.image_kv`) and shared by all its candidate captions (a
broadcast view: nothing of the image is copied or recomputed per caption). :func:`pair_scores_uncached` is the
LAVIS-style reference path;
the scores agree to float rounding (tests/vlalign/eval/test_rerank.py) and benchmarks/bench_rerank.py measures time
and FLOPs of the two.

Ranks use the pessimistic tie rule of :mod:`vlalign.eval.retrieval`, so the ITC-only metrics here equal
:func:`~vlalign.eval.retrieval.retrieval_metrics` of the same embeddings exactly, and the candidate lists break ITC
ties by index, so metrics depend on the scores only, never on a kernel's order among equal ones. Two paths that
compute the same scores in another order (cached and uncached fusion, or another CPU's kernels) can still differ
in the last bits and so flip a near-tie: compare their scores within a rounding tolerance, not their metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from vlalign.errors import ConfigError, dataclass_from_mapping
from vlalign.eval.retrieval import RetrievalRanks, recall_from_ranks, retrieval_chance, retrieval_ranks

log = logging.getLogger(__name__)


SCORES = ("itm+itc", "itm")
#: ITM weights tried on the validation split (``itm_weight: validation``); ties go to the larger weight.
WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class RerankConfig:
    """``evaluation.rerank`` parameters."""

    k_test: int = 128  # candidates per query re-scored by ITM (ALBEF/BLIP: 128 on Flickr30k, 256 on COCO)
    batch_size: int = 256  # image-caption pairs fused at once
    cache: bool = True  # per-image K/V cache (false: the LAVIS-style path, K/V recomputed for every pair)
    score: str = "itm+itc"  # itm+itc: ITM log-odds + ITC logit (BLIP, BLIP-2 in LAVIS); itm: ITM alone (ALBEF)
    itm_weight: float | str = "validation"  # w in w * ITM + ITC (itm+itc): a number, or chosen on the val split
    validation_split: str = "val"  # the split itm_weight: validation is chosen on

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ConfigError(f"evaluation.rerank.score={self.score!r}; expected one of {list(SCORES)}.")
        weight = self.itm_weight
        if weight != "validation" and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
            raise ConfigError(f"evaluation.rerank.itm_weight={weight!r}; expected a number >= 0 or 'validation'.")
        if not isinstance(self.k_test, int) or self.k_test < 1:
            raise ConfigError(f"evaluation.rerank.k_test={self.k_test!r}; expected a positive integer (e.g. 128).")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"evaluation.rerank.batch_size={self.batch_size!r}; expected a positive integer.")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RerankConfig:
        """From the ``evaluation.rerank`` mapping, naming unknown keys."""
        return dataclass_from_mapping(cls, data, "evaluation.rerank", "key(s)")


@dataclass
class RerankInputs:
    """Everything re-ranking needs of a retrieval set, computed once."""

    image_tokens: torch.Tensor  # (N, T, C) image-tower tokens
    image_emb: torch.Tensor  # (N, D) unit ITC embeddings
    text_tokens: torch.Tensor  # (M, L, H) text-only layer outputs
    text_mask: torch.Tensor  # (M, L) attention mask
    text_emb: torch.Tensor  # (M, D) unit ITC embeddings


def has_itm_head(model: nn.Module) -> bool:
    """Whether the model can score a fused image-text pair (arch ``fusion``)."""
    return callable(getattr(model, "itm_logits", None)) and getattr(model, "itm_head", None) is not None


def itm_score(logits: torch.Tensor) -> torch.Tensor:
    """(P, 2) ITM logits -> (P,) log-odds of a match."""
    return (logits[:, 1] - logits[:, 0]).float()


# ------------------------------------------------------------------------------------------------ pair scoring


def _trim(text_tokens: torch.Tensor, text_mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The captions ``rows`` without the padding columns none of them uses: (n, L', H), (n, L')."""
    mask = text_mask[rows]
    length = max(int(mask.sum(dim=1).max()), 1)
    return text_tokens[rows, :length], mask[:, :length]


@torch.no_grad()
def pair_scores_uncached(model: nn.Module, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                         text_mask: torch.Tensor, pairs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """ITM log-odds of each ``(image, caption)`` row of ``pairs`` (P, 2), fusing ``batch_size`` pairs at once with
    the image tokens given per pair, so the cross-attention K/V are computed again for every pair (LAVIS). (P,)."""
    scores = torch.empty(pairs.shape[0], device=text_tokens.device)
    for start in range(0, pairs.shape[0], batch_size):
        chunk = pairs[start:start + batch_size]
        tokens, mask = _trim(text_tokens, text_mask, chunk[:, 1])
        scores[start:start + batch_size] = itm_score(model.itm_logits(tokens, mask, image_tokens[chunk[:, 0]]))
    return scores


@torch.no_grad()
def pair_scores_cached(model: nn.Module, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                       text_mask: torch.Tensor, pairs: torch.Tensor, batch_size: int = 256,
                       image_chunk: int = 64) -> torch.Tensor:
    """ITM log-odds of each ``(image, caption)`` row of ``pairs`` (P, 2), each image's cross-attention K/V computed
    once (for ``image_chunk`` images at a time) and shared by all its captions. (P,), in the order of ``pairs``."""
    scores = torch.empty(pairs.shape[0], device=text_tokens.device)
    order = torch.argsort(pairs[:, 0], stable=True)  # (P,) pairs grouped by image
    images, counts = torch.unique_consecutive(pairs[order, 0], return_counts=True)  # (G,), (G,)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [end - int(c) for end, c in zip(ends, counts)]
    for first in range(0, images.shape[0], image_chunk):
        kv = model.image_kv(image_tokens[images[first:first + image_chunk]])  # per layer (u, h, T, d) x 2
        for j, g in enumerate(range(first, min(first + image_chunk, images.shape[0]))):
            own = [(k[j:j + 1], v[j:j + 1]) for k, v in kv]  # this image's K/V, broadcast to its captions
            rows = order[starts[g]:ends[g]]
            for start in range(0, rows.shape[0], batch_size):
                chunk = rows[start:start + batch_size]
                tokens, mask = _trim(text_tokens, text_mask, pairs[chunk, 1])
                scores[chunk] = itm_score(model.itm_logits(tokens, mask, kv=own))
    return scores


# ------------------------------------------------------------------------------------------------ re-ranking


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, C) scores -> (Q, min(k, C)) indices of each row's k best, best first; equal scores in index order.

    ``torch.topk`` (and an unstable sort) may return tied candidates in any order, which differs between CPU
    kernels, so which of several equal candidates makes the cut would depend on the machine. A stable descending
    sort keeps ties in index order: the lower index is ranked first, on any device and kernel.
    """
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (Q, k)


def candidate_lists(image_emb: torch.Tensor, text_emb: torch.Tensor, k_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k_test`` by ITC: captions per image (N, k) and images per caption (M, k'); ties go to the lower
    index (:func:`top_k_indices`)."""
    sims = image_emb @ text_emb.T  # (N, M)
    return top_k_indices(sims, k_test), top_k_indices(sims.T, k_test)  # (N, k), (M, k')


def _pairs(i2t: torch.Tensor, t2i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, caption) pairs of the image->text lists (N*k, 2) and of the caption->image lists (M*k', 2)."""
    n, k = i2t.shape
    m, k2 = t2i.shape
    forward = torch.stack([torch.arange(n, device=i2t.device).repeat_interleave(k), i2t.reshape(-1)], dim=1)
    backward = torch.stack([t2i.reshape(-1), torch.arange(m, device=t2i.device).repeat_interleave(k2)], dim=1)
    return forward, backward


def itc_logits(model: nn.Module, inputs: RerankInputs, pairs: torch.Tensor) -> torch.Tensor:
    """(P,) ITC logits of ``(image, caption)`` pairs (P, 2): cosine of the unit embeddings times the model's logit
    scale (its learned inverse temperature; 1 for a model without one)."""
    cosine = (inputs.image_emb[pairs[:, 0]].float() * inputs.text_emb[pairs[:, 1]].float()).sum(dim=1)  # (P,)
    return logit_scale_of(model) * cosine


def logit_scale_of(model: nn.Module) -> float:
    """The model's ITC inverse temperature exp(logit_scale) (1 for a model without one)."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().float().exp()) if isinstance(scale, torch.Tensor) else 1.0


@torch.no_grad()
def rerank_score_matrices(model: nn.Module, inputs: RerankInputs, k_test: int, batch_size: int = 256,
                          cache: bool = True, score: str = "itm+itc",
                          itm_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Re-ranked score matrices: caption->image (M, N) and image->text (N, M), each query's top ``k_test`` scored
    by ITM log-odds (``score`` itm) or ``itm_weight`` · ITM log-odds + ITC logit (itm+itc), −∞ elsewhere; and the
    pairs fused.

    With ``cache`` the pairs of both directions are pooled, scored once each with the per-image K/V cache; without,
    each direction's lists are scored as LAVIS does (image tokens per pair)."""
    n, m = inputs.image_emb.shape[0], inputs.text_emb.shape[0]
    i2t, t2i = candidate_lists(inputs.image_emb, inputs.text_emb, k_test)
    forward, backward = _pairs(i2t, t2i)
    args = (model, inputs.image_tokens, inputs.text_tokens, inputs.text_mask)
    if cache:
        keys = torch.cat([forward, backward])  # (P, 2)
        unique, inverse = torch.unique(keys[:, 0] * m + keys[:, 1], return_inverse=True)  # a pair found twice, once
        scored = pair_scores_cached(*args, torch.stack([unique // m, unique % m], dim=1), batch_size)
        scores = scored[inverse]
        forward_scores, backward_scores = scores[: forward.shape[0]], scores[forward.shape[0]:]
        fused = unique.shape[0]
    else:
        forward_scores = pair_scores_uncached(*args, forward, batch_size)
        backward_scores = pair_scores_uncached(*args, backward, batch_size)
        fused = forward.shape[0] + backward.shape[0]
    if score == "itm+itc":
        w = float(itm_weight)
        forward_scores = w * forward_scores + itc_logits(model, inputs, forward).to(forward_scores.device)
        backward_scores = w * backward_scores + itc_logits(model, inputs, backward).to(backward_scores.device)
    image_to_text = torch.full((n, m), float("-inf"), device=forward_scores.device)
    image_to_text[forward[:, 0], forward[:, 1]] = forward_scores
    text_to_image = torch.full((m, n), float("-inf"), device=backward_scores.device)
    text_to_image[backward[:, 1], backward[:, 0]] = backward_scores
    return text_to_image, image_to_text, fused


def ranks_from_scores(text_to_image_scores: torch.Tensor, image_to_text_scores: torch.Tensor,
                      text_to_image: torch.Tensor) -> RetrievalRanks:
    """Pessimistic ranks (as :func:`vlalign.eval.retrieval.retrieval_ranks`) from full score matrices: caption->image
    (M, N) and image->text (N, M); ``text_to_image`` (M,) gives each caption's image."""
    m, n = text_to_image_scores.shape
    correct = text_to_image_scores.gather(1, text_to_image[:, None])  # (M, 1)
    image_ranks = (text_to_image_scores >= correct).sum(dim=1) - 1  # (M,) incorrect images scoring >= the correct one
    is_correct = torch.zeros(n, m, dtype=torch.bool, device=image_to_text_scores.device)
    is_correct[text_to_image, torch.arange(m, device=text_to_image.device)] = True  # (N, M)
    best = image_to_text_scores.masked_fill(~is_correct, float("-inf")).amax(dim=1, keepdim=True)  # (N, 1)
    at_least = image_to_text_scores >= best  # (N, M)
    text_ranks = at_least.sum(dim=1) - (at_least & is_correct).sum(dim=1)  # (N,)
    return RetrievalRanks(image_retrieval=image_ranks.long(), text_retrieval=text_ranks.long())


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def rerank_inputs(model: nn.Module, cfg: Any, image_paths: list[str], image_roots: list[str], captions: list[str],
                  batch_size: int = 256) -> RerankInputs:
    """Image tokens and ITC embeddings of the images, text-only states and ITC embeddings of the captions."""
    import torch.nn.functional as F

    from vlalign.data.images import decode_roots, open_image
    from vlalign.data.tokenizers import tokenize
    from vlalign.data.transforms import build_transform
    from vlalign.models.towers import build_tokenizer_for

    was_training = model.training
    model.eval()
    transform = build_transform(cfg, train=False)
    tokens, pooled = [], []
    for start in range(0, len(image_paths), batch_size):
        window = zip(image_paths[start:start + batch_size], image_roots[start:start + batch_size])
        pixels = torch.stack([transform(open_image(p, decode_roots(r))) for p, r in window])  # (b, 3, H, W)
        t, p = model.image_outputs(pixels)  # (b, T, C), (b, C)
        tokens.append(t)
        pooled.append(F.normalize(model.image_proj(p), dim=-1))
    text = tokenize(build_tokenizer_for(cfg), captions, cfg.text.context_length)
    length = max(int(text["attention_mask"].sum(dim=1).max()), 1)
    ids, mask = text["input_ids"][:, :length], text["attention_mask"][:, :length]  # (M, L)
    states, embs = [], []
    for start in range(0, len(captions), batch_size):
        s, p = model.text_outputs(ids[start:start + batch_size], mask[start:start + batch_size])  # (b, L, H), (b, H)
        states.append(s)
        embs.append(F.normalize(model.text_proj(p), dim=-1))
    model.train(was_training)
    return RerankInputs(torch.cat(tokens), torch.cat(pooled), torch.cat(states), mask, torch.cat(embs))


def choose_itm_weight(model: nn.Module, cfg: Any, manifest: pd.DataFrame, lang: str, config: RerankConfig,
                      batch_size: int = 256) -> tuple[float, str, dict[str, float]]:
    """The ITM weight of ``w · ITM + ITC`` to evaluate with: ``config.itm_weight`` when it is a number (or the score
    is ``itm``); with ``validation`` the weight of :data:`WEIGHT_GRID` whose re-ranking has the highest mean recall
    on the validation split's pairs (ties: the larger weight). Returns (weight, where it came from, the grid's
    validation mean recalls)."""
    from vlalign.eval.run import retrieval_inputs

    if config.score != "itm+itc" or config.itm_weight != "validation":
        return (1.0 if config.score == "itm" else float(config.itm_weight)), "config", {}
    if not ((manifest["split"] == config.validation_split) & (manifest["lang"] == lang)).any():
        log.warning("ITM re-ranking: no %r split in %s to choose itm_weight on; w = 1.", config.validation_split, lang)
        return 1.0, f"default: no {config.validation_split!r} split", {}
    paths, roots, captions, text_to_image = retrieval_inputs(manifest, config.validation_split, lang)
    inputs = rerank_inputs(model, cfg, paths, roots, captions, batch_size)
    t2i, i2t, _ = rerank_score_matrices(model, inputs, config.k_test, config.batch_size, config.cache, "itm")
    logits = logit_scale_of(model) * (inputs.image_emb.float() @ inputs.text_emb.float().T)  # (N, M) ITC logits
    scores = {}
    for w in WEIGHT_GRID:
        combined_t2i = torch.where(torch.isfinite(t2i), w * t2i + logits.T, t2i)  # (M, N), -inf off the candidates
        combined_i2t = torch.where(torch.isfinite(i2t), w * i2t + logits, i2t)  # (N, M)
        ranks = ranks_from_scores(combined_t2i, combined_i2t, text_to_image)
        scores[str(w)] = recall_from_ranks(ranks)["mean_recall"]
    best = max(WEIGHT_GRID, key=lambda w: (scores[str(w)], w))
    return best, f"validation ({config.validation_split} split)", scores


def evaluate_rerank(model: nn.Module, cfg: Any, manifest: pd.DataFrame, split: str = "test", lang: str = "en",
                    config: RerankConfig | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Retrieval ranked by ITC alone (``itc_metrics``) and with the top ``k_test`` re-scored (``metrics``: ITM, or
    w · ITM + ITC with w chosen on validation), beside chance, on the ``split`` captions in ``lang`` (the
    multi-caption protocol of ``evaluate_retrieval``)."""
    from vlalign.eval.run import retrieval_inputs

    if not has_itm_head(model):
        raise ConfigError(f"ITM re-ranking needs a model with an ITM head (arch fusion); {cfg.name!r} is arch {cfg.arch!r}.")
    config = config or RerankConfig()
    was_training = model.training
    model.eval()
    weight, weight_from, weight_scores = choose_itm_weight(model, cfg, manifest, lang, config, batch_size)
    paths, roots, captions, text_to_image = retrieval_inputs(manifest, split, lang)
    inputs = rerank_inputs(model, cfg, paths, roots, captions, batch_size)
    itc = retrieval_ranks(inputs.image_emb, inputs.text_emb, text_to_image)
    model.eval()
    t2i, i2t, fused = rerank_score_matrices(model, inputs, config.k_test, config.batch_size, config.cache, config.score,
                                            weight)
    model.train(was_training)
    return {
        "split": split,
        "language": lang,
        "n_images": len(paths),
        "n_captions": len(captions),
        "k_test": config.k_test,
        "score": config.score,
        "itm_weight": weight,
        "itm_weight_from": weight_from,
        "itm_weight_scores": weight_scores,
        "n_pairs_fused": fused,
        "metrics": recall_from_ranks(ranks_from_scores(t2i, i2t, text_to_image)),
        "itc_metrics": recall_from_ranks(itc),
        "chance": retrieval_chance(text_to_image, len(paths)),
    }
