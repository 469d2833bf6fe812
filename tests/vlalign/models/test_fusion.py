"""The fusion arch (ALBEF / BLIP): its surface, tied heads, the per-image K/V cache, the teacher copy, sampling."""

from __future__ import annotations

import pytest
import torch

from vlalign.errors import ConfigError
from vlalign.models import build_model, get_model_config, list_models
from vlalign.models.fusion import FusionModel, nucleus_filter

from shared import TINY


def _model(**options) -> FusionModel:
    torch.manual_seed(0)
    cfg = get_model_config("tiny-vit-bert", **TINY, arch="fusion",
                           arch_options={"fusion_layers": 2, "decoder_layers": 1, **options})
    return build_model(cfg).eval()


def _texts():
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0], [2, 14, 15, 3, 0]])
    return ids, (ids > 0).long()


def test_named_configs_build_and_keep_the_dual_surface() -> None:
    assert {"tiny-fusion", "vit-b16-bert-base-fusion"} <= set(list_models())
    big = get_model_config("vit-b16-bert-base-fusion")
    assert (big.arch, big.arch_options["fusion_layers"], big.text.num_layers, big.text.hidden_size) == ("fusion", 6, 6, 768)
    model = _model()
    ids, mask = _texts()
    pixels = torch.randn(3, 3, 32, 32)
    out = model({"pixels": pixels, "input_ids": ids, "attention_mask": mask})
    assert out["image_features"].shape == out["text_features"].shape == (3, 16)
    assert torch.allclose(out["image_features"], model.encode_image(pixels), atol=1e-6)
    assert torch.allclose(out["text_features"], model.encode_text(ids, mask), atol=1e-6)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3))
    assert model.itm_logits(out["text_tokens"], mask, out["image_tokens"]).shape == (3, 2)
    with pytest.raises(ConfigError, match=r"arch_options.fusion_layers=0"):
        _model(fusion_layers=0)


def test_heads_are_tied_to_the_word_embeddings() -> None:
    model = _model()
    words = model.text_tower.transformer.get_input_embeddings().weight
    assert model.mlm_head.decoder.weight is words and model.decoder.head.decoder.weight is words
    assert model.decoder.word_embeddings.weight is words
    trainable = {id(p) for p in model.parameters()}
    assert len(trainable) == len(list(model.parameters()))  # a tied matrix is one parameter
    assert _model(mlm_head=False, decoder_layers=0).mlm_head is None


def test_kv_cache_gives_the_scores_of_the_uncached_fusion() -> None:
    model = _model()
    ids, mask = _texts()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image_tokens = model.image_outputs(images)[0]  # (2, T, C)
        text_tokens = model.text_outputs(ids, mask)[0]  # (3, L, H)
        kv = model.image_kv(image_tokens)
        # every caption against image 1: the shared-image path (one attention over the stacked queries)
        shared = model.itm_logits(text_tokens, mask, kv=[(k[1:], v[1:]) for k, v in kv])
        direct = model.itm_logits(text_tokens, mask, image_tokens[1:].expand(3, -1, -1))
        assert torch.allclose(shared, direct, atol=1e-5)
        # arbitrary pairs through the gathered cache
        pairs = torch.tensor([1, 0, 1])
        gathered = model.itm_logits(text_tokens, mask, kv=kv, kv_index=pairs)
        assert torch.allclose(gathered, model.itm_logits(text_tokens, mask, image_tokens[pairs]), atol=1e-5)
        assert not torch.allclose(gathered, shared)


def test_momentum_teacher_is_a_copy_without_decoder_and_itm_head() -> None:
    model = _model()
    teacher = model.momentum_teacher()
    assert teacher.decoder is None and teacher.itm_head is None and model.decoder is not None
    assert teacher.mlm_head.decoder.weight is teacher.text_tower.transformer.get_input_embeddings().weight
    assert teacher.mlm_head.decoder.weight is not model.mlm_head.decoder.weight
    ids, mask = _texts()
    assert torch.equal(teacher.encode_text(ids, mask), model.encode_text(ids, mask))


def test_nucleus_filter_keeps_the_smallest_top_mass() -> None:
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.97, 0.01, 0.01, 0.01]])
    got = nucleus_filter(probs, 0.7)
    assert torch.allclose(got[0], torch.tensor([0.625, 0.0, 0.375, 0.0]))  # 0.5 + 0.3 reach 0.7
    assert torch.equal(got[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # the top token alone
    assert torch.allclose(nucleus_filter(probs, 1.0), probs)


def test_nucleus_filter_takes_equally_likely_tokens_in_vocabulary_order() -> None:
    """Which of two equally likely tokens makes the cut must not depend on the sort kernel (a stable sort)."""
    got = nucleus_filter(torch.tensor([[0.1, 0.2, 0.1, 0.2, 0.1, 0.3]]), 0.45)  # 0.3, then token 1 before token 3
    assert torch.allclose(got, torch.tensor([[0.0, 0.4, 0.0, 0.0, 0.0, 0.6]]))
    got = nucleus_filter(torch.full((1, 8), 0.125), 0.45)
    assert torch.allclose(got, torch.tensor([[0.25] * 4 + [0.0] * 4]))  # the first four of eight equal tokens


def test_generate_samples_captions_that_end_and_never_use_banned_tokens() -> None:
    model = _model()
    generator = torch.Generator().manual_seed(0)
    ids = model.generate(torch.randn(4, 3, 32, 32), bos_id=2, eos_id=3, pad_id=0, banned_ids=[0, 1, 2, 4],
                         max_length=12, min_length=3, generator=generator)
    assert ids.shape[0] == 4 and ids.shape[1] <= 12 and (ids[:, 0] == 2).all()
    body = ids[:, 1:]
    for row in body.tolist():
        end = row.index(3) if 3 in row else len(row)
        assert end >= 2  # no [SEP] before min_length
        assert not set(row[:end]) & {0, 1, 2, 4}
        assert all(t == 0 for t in row[end + 1:])  # padding after [SEP]
    again = model.generate(torch.zeros(1, 3, 32, 32), 2, 3, 0, [0, 1, 2, 4], generator=torch.Generator().manual_seed(5))
    same = model.generate(torch.zeros(1, 3, 32, 32), 2, 3, 0, [0, 1, 2, 4], generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, same)
    with pytest.raises(ConfigError, match="no caption decoder"):
        _model(decoder_layers=0).generate(torch.zeros(1, 3, 32, 32), 2, 3, 0, [])
