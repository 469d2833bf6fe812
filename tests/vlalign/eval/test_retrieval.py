"""Retrieval metrics: hand-built multi-caption cases, pessimistic ties, chunking, chance, reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlalign.eval.retrieval import (
    recall_curve,
    retrieval_chance,
    retrieval_metrics,
    retrieval_ranks,
)


def reference_ranks(image_emb, text_emb, text_to_image):
    """Straightforward full-matrix reference: sort every query's candidates by (score desc, correct last).

    The rank is the position of the first correct candidate in that order, i.e. the number of
    incorrect candidates ahead of it, with every tie resolved against the correct candidate.
    """
    scores = (text_emb.double() @ image_emb.double().T).tolist()  # (M, N)
    mapping = text_to_image.tolist()
    n_images = len(image_emb)
    t2i = []
    for j, row in enumerate(scores):
        order = sorted(range(n_images), key=lambda i: (-row[i], i == mapping[j]))
        t2i.append(order.index(mapping[j]))
    i2t = []
    for i in range(n_images):
        column = [row[i] for row in scores]
        order = sorted(range(len(column)), key=lambda j: (-column[j], mapping[j] == i))
        i2t.append(next(pos for pos, j in enumerate(order) if mapping[j] == i))
    return t2i, i2t


def reference_metrics(image_emb, text_emb, text_to_image, ks):
    t2i, i2t = reference_ranks(image_emb, text_emb, text_to_image)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = sum(r < k for r in t2i) / len(t2i)
        out[f"text_retrieval_recall@{k}"] = sum(r < k for r in i2t) / len(i2t)
    return out


def random_problem(seed, n_images=30, dim=16, max_captions=4, integer=False):
    """Random embeddings with 1..max_captions captions per image, shuffled.

    With ``integer=True`` entries are small integers: dot products are exact in any summation
    order (so results cannot depend on chunking) and exact ties are frequent. Otherwise they are
    near-unit vectors snapped to multiples of 2**-8: every product is a multiple of 2**-16 below
    ``dim`` in size, which float32's 24-bit significand holds exactly, so the scores too are exact
    in any order (any chunking, BLAS kernel or CPU, and equal to the float64 reference) while ties
    stay rare. Unsnapped floats could differ in the last bit between two products and flip a near-tie.
    """
    gen = torch.Generator().manual_seed(seed)
    per_image = torch.randint(1, max_captions + 1, (n_images,), generator=gen)
    text_to_image = torch.repeat_interleave(torch.arange(n_images), per_image)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]
    if integer:
        image_emb = torch.randint(-2, 3, (n_images, dim), generator=gen).float()
        text_emb = image_emb[text_to_image] + torch.randint(-2, 3, (len(text_to_image), dim), generator=gen).float()
    else:
        image_emb = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
        text_emb = F.normalize(image_emb[text_to_image] + 0.8 * torch.randn(len(text_to_image), dim, generator=gen), dim=-1)
        assert dim <= 2**8  # |score| <= dim on a 2**-16 grid: at most 24 significant bits
        image_emb, text_emb = torch.round(image_emb * 2**8) / 2**8, torch.round(text_emb * 2**8) / 2**8
    return image_emb, text_emb, text_to_image


# Three images (unit axes) and five captions whose scores are exact dyadic fractions:
#   caption:   c0       c1          c2            c3           c4
#   image:     0        0           1             1            2
#   scores vs (I0, I1, I2):
#              1,0,0    0,.5,.25    .5,.25,0      0,.75,.5     .5,0,.25
HAND_IMAGES = torch.eye(3)
HAND_TEXTS = torch.tensor(
    [[1.0, 0.0, 0.0], [0.0, 0.5, 0.25], [0.5, 0.25, 0.0], [0.0, 0.75, 0.5], [0.5, 0.0, 0.25]]
)
HAND_MAP = torch.tensor([0, 0, 1, 1, 2])


def test_hand_built_multi_caption_ranks():
    ranks = retrieval_ranks(HAND_IMAGES, HAND_TEXTS, HAND_MAP)
    # text -> image: c1's image I0 scores 0 and both other images score >= 0 -> rank 2.
    assert ranks.image_retrieval.tolist() == [0, 2, 1, 0, 1]
    # image -> text: I1's first caption c2 (0.25) is beaten by c1 (0.5), but its second caption c3
    # (0.75) is the best of all, so I1 is retrieved at rank 0 only through its second caption.
    # I2's only caption c4 (0.25) ties with c1 (0.25) and is beaten by c3 (0.5): rank 2, pessimistically.
    assert ranks.text_retrieval.tolist() == [0, 0, 2]


def test_hand_built_multi_caption_metrics():
    metrics = retrieval_metrics(HAND_IMAGES, HAND_TEXTS, HAND_MAP, ks=(1, 2, 3))
    expected = {
        "image_retrieval_recall@1": 2 / 5,
        "text_retrieval_recall@1": 2 / 3,
        "image_retrieval_recall@2": 4 / 5,
        "text_retrieval_recall@2": 2 / 3,
        "image_retrieval_recall@3": 1.0,
        "text_retrieval_recall@3": 1.0,
    }
    recalls = list(expected.values())
    expected["mean_recall"] = sum(recalls) / 6
    expected["rsum"] = 100 * sum(recalls)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_default_keys_are_clip_benchmark_names():
    metrics = retrieval_metrics(HAND_IMAGES, HAND_TEXTS, HAND_MAP)
    assert list(metrics) == [
        "image_retrieval_recall@1", "text_retrieval_recall@1",
        "image_retrieval_recall@5", "text_retrieval_recall@5",
        "image_retrieval_recall@10", "text_retrieval_recall@10",
        "mean_recall", "rsum",
    ]
    # k beyond the number of candidates: everything is retrieved.
    assert metrics["image_retrieval_recall@5"] == 1.0 and metrics["text_retrieval_recall@10"] == 1.0


def test_constant_embeddings_get_no_credit_for_ties():
    n_images, per_image = 4, 2
    image_emb = torch.ones(n_images, 3)
    text_emb = torch.ones(n_images * per_image, 3)
    mapping = torch.arange(n_images).repeat_interleave(per_image)
    ks = (1, 3, 4, 6, 7)
    metrics = retrieval_metrics(image_emb, text_emb, mapping, ks=ks)
    # text -> image: all 3 incorrect images tie with the correct one, so it counts only for k >= 4.
    assert [metrics[f"image_retrieval_recall@{k}"] for k in ks] == [0.0, 0.0, 1.0, 1.0, 1.0]
    # image -> text: all 6 incorrect captions tie with the best correct one: a hit only for k >= 7.
    assert [metrics[f"text_retrieval_recall@{k}"] for k in ks] == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_tied_correct_captions_do_not_hurt_each_other():
    # Both captions of image 0 tie with each other and beat everything: rank 0 in both directions.
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ranks = retrieval_ranks(image_emb, text_emb, torch.tensor([0, 0, 1]))
    assert ranks.image_retrieval.tolist() == [0, 0, 0]
    assert ranks.text_retrieval.tolist() == [0, 0]


@pytest.mark.parametrize("integer", [False, True], ids=["float", "integer-with-ties"])
def test_chunk_size_does_not_change_results(integer):
    image_emb, text_emb, mapping = random_problem(1, n_images=40, integer=integer)
    base = retrieval_ranks(image_emb, text_emb, mapping, chunk_size=10_000)
    for chunk in (1, 3, 7):
        ranks = retrieval_ranks(image_emb, text_emb, mapping, chunk_size=chunk)
        assert torch.equal(ranks.image_retrieval, base.image_retrieval)
        assert torch.equal(ranks.text_retrieval, base.text_retrieval)
    assert retrieval_metrics(image_emb, text_emb, mapping, chunk_size=1) == retrieval_metrics(
        image_emb, text_emb, mapping, chunk_size=10_000
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_full_matrix_reference_without_ties(seed):
    image_emb, text_emb, mapping = random_problem(seed)
    ks = (1, 2, 5, 10, 25)
    expected = reference_metrics(image_emb, text_emb, mapping, ks)
    metrics = retrieval_metrics(image_emb, text_emb, mapping, ks=ks, chunk_size=8)
    assert {k: metrics[k] for k in expected} == expected
    assert 0 < metrics["image_retrieval_recall@1"] < 1  # the check is not vacuous


def test_agrees_with_full_matrix_reference_with_many_ties():
    image_emb, text_emb, mapping = random_problem(3, n_images=25, dim=3, integer=True)
    scores = text_emb @ image_emb.T
    assert len(torch.unique(scores)) < scores.numel() / 10  # ties everywhere
    t2i, i2t = reference_ranks(image_emb, text_emb, mapping)
    ranks = retrieval_ranks(image_emb, text_emb, mapping, chunk_size=4)
    assert ranks.image_retrieval.tolist() == t2i
    assert ranks.text_retrieval.tolist() == i2t


def test_recall_curve_matches_metrics_at_every_k():
    image_emb, text_emb, mapping = random_problem(4)
    max_k = 12
    curve = recall_curve(image_emb, text_emb, mapping, max_k=max_k, chunk_size=5)
    metrics = retrieval_metrics(image_emb, text_emb, mapping, ks=range(1, max_k + 1))
    assert curve["k"] == list(range(1, max_k + 1))
    assert curve["image_retrieval_recall"] == [metrics[f"image_retrieval_recall@{k}"] for k in curve["k"]]
    assert curve["text_retrieval_recall"] == [metrics[f"text_retrieval_recall@{k}"] for k in curve["k"]]
    assert curve["text_retrieval_recall"] == sorted(curve["text_retrieval_recall"])


def test_half_precision_embeddings_are_scored_in_float32():
    image_emb, text_emb, mapping = random_problem(5)
    half = retrieval_metrics(image_emb.bfloat16(), text_emb.bfloat16(), mapping)
    upcast = retrieval_metrics(image_emb.bfloat16().float(), text_emb.bfloat16().float(), mapping)
    assert half == upcast


def test_chance_closed_forms():
    # One caption per image: both directions are k / N.
    chance = retrieval_chance(torch.arange(10), 10, ks=(1, 3, 20))
    assert chance["image_retrieval_recall@3"] == pytest.approx(0.3)
    assert chance["text_retrieval_recall@3"] == pytest.approx(0.3)
    assert chance["image_retrieval_recall@20"] == 1.0 and chance["text_retrieval_recall@20"] == 1.0
    # Image 0 has 2 of 4 captions, image 1 has 2: P(hit@1) = 1/2, P(hit@2) = 1 - C(2,2)/C(4,2) = 5/6.
    chance = retrieval_chance(torch.tensor([0, 0, 1, 1]), 2, ks=(1, 2))
    assert chance["text_retrieval_recall@1"] == pytest.approx(0.5)
    assert chance["text_retrieval_recall@2"] == pytest.approx(5 / 6)
    assert chance["mean_recall"] == pytest.approx((0.5 + 0.5 + 1.0 + 5 / 6) / 4)
    assert chance["rsum"] == pytest.approx(100 * (0.5 + 0.5 + 1.0 + 5 / 6))


def test_chance_matches_monte_carlo_of_random_rankings():
    # Uniformly random rankings: argsort of i.i.d. uniform scores, one per trial and query.
    gen = torch.Generator().manual_seed(0)
    n_images, trials, ks = 12, 4000, (1, 2, 5)
    mapping = torch.repeat_interleave(torch.arange(n_images), torch.tensor([1, 2, 3, 4] * 3))  # (M,)
    n_captions = len(mapping)
    image_order = torch.rand(trials, n_captions, n_images, generator=gen).argsort(dim=-1)  # (T, M, N)
    text_order = torch.rand(trials, n_images, n_captions, generator=gen).argsort(dim=-1)  # (T, N, M)
    chance = retrieval_chance(mapping, n_images, ks)
    for k in ks:
        t2i_hit = (image_order[..., :k] == mapping[None, :, None]).any(dim=-1)  # (T, M)
        i2t_hit = (mapping[text_order[..., :k]] == torch.arange(n_images)[None, :, None]).any(dim=-1)  # (T, N)
        for key, hits in ((f"image_retrieval_recall@{k}", t2i_hit), (f"text_retrieval_recall@{k}", i2t_hit)):
            per_trial = hits.double().mean(dim=1)  # (T,) the recall of each trial
            stderr = float(per_trial.std()) / math.sqrt(trials)
            assert abs(float(per_trial.mean()) - chance[key]) < 4.5 * stderr, key


def test_random_embeddings_score_near_chance():
    # End to end: i.i.d. embeddings make each query's ranking uniform, so recall ~ chance.
    gen = torch.Generator().manual_seed(1)
    mapping = torch.arange(400).repeat_interleave(2)
    metrics = retrieval_metrics(torch.randn(400, 16, generator=gen), torch.randn(800, 16, generator=gen), mapping)
    chance = retrieval_chance(mapping, 400)
    for key in ("image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert metrics[key] == pytest.approx(chance[key], abs=0.03), key


def test_image_without_caption_is_rejected():
    with pytest.raises(ValueError, match=r"1 of 3 images have no caption.*image rows 2"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_chance(torch.tensor([0, 1]), 3, ks=(1,))


@pytest.mark.parametrize(
    ("image_emb", "text_emb", "mapping", "kwargs", "message"),
    [
        (torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]), {}, r"image index 3, outside \[0, 3\)"),
        (torch.eye(3), torch.eye(3), torch.tensor([0, 1]), {}, "2 entries but text_emb has 3 rows"),
        (torch.eye(3), torch.ones(3, 4), torch.tensor([0, 1, 2]), {}, "dimension 3 but text_emb has 4"),
        (torch.eye(3), torch.eye(3), torch.tensor([0.0, 1.0, 2.0]), {}, "integer tensor"),
        (torch.eye(3), torch.full((3, 3), float("nan")), torch.tensor([0, 1, 2]), {}, "text_emb row 0 holds NaN"),
        (torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]), {"ks": (0,)}, "positive ints"),
        (torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]), {"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_inputs_raise_clear_errors(image_emb, text_emb, mapping, kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(image_emb, text_emb, mapping, **kwargs)
