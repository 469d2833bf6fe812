"""Tests of the WordPiece tokenizer helpers and the packaged demo vocabulary."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from vlalign.data import demo
from vlalign.data.demo import DemoConfig, chinese_captions, english_captions, generate_demo_dataset
from vlalign.data.tokenizers import build_tokenizer, demo_vocab_path, tokenize
from vlalign.errors import ConfigError, WeightsNotFoundError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(demo_vocab_path())


def _texts_with_unk(tokenizer, texts: list[str]) -> list[str]:
    """Return the texts that produce at least one [UNK]."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [text for text, row in zip(texts, ids) if tokenizer.unk_token_id in row]


def test_every_vocab_line_gets_its_line_number_as_id(tokenizer):
    lines = demo_vocab_path().read_text(encoding="utf-8").splitlines()
    assert len(tokenizer) == len(lines)
    assert tokenizer.convert_tokens_to_ids(lines) == list(range(len(lines)))
    assert tokenizer.pad_token_id == 0


def test_pkg_spec_resolves_to_the_packaged_file():
    assert demo_vocab_path().name == "demo_vocab.txt" and demo_vocab_path().is_file()
    by_spec = build_tokenizer("pkg:vlalign/assets/demo_vocab.txt")
    assert by_spec.tokenize("a red circle") == ["a", "red", "circle"]


def test_demo_dataset_captions_have_no_unknown_tokens(tokenizer, tmp_path):
    root = generate_demo_dataset(tmp_path / "d", DemoConfig(n_train=30, n_val=5, n_test=5, zero_shot_per_class=1))
    texts = []
    for name in ("dataset_demo.json", "dataset_demo_zh.json"):
        images = json.loads((root / "flickr_demo" / name).read_text(encoding="utf-8"))["images"]
        texts += [s["raw"] for image in images for s in image["sentences"]]
    for name in ("classnames_en.txt", "classnames_zh.txt"):
        texts += (root / "imagenet_demo" / name).read_text(encoding="utf-8").splitlines()
    assert len(texts) > 250
    assert _texts_with_unk(tokenizer, texts) == []


def test_whole_grammar_has_no_unknown_tokens(tokenizer):
    """Every attribute combination, every template, several wordings: no [UNK] in EN or ZH."""
    rng = random.Random(0)
    texts = []
    for colour, shape, size, position, count in itertools.product(
        demo.COLOURS, demo.SHAPES, demo.SIZES, demo.POSITIONS, demo.COUNTS
    ):
        attrs = {"colour": colour, "shape": shape, "size": size, "position": position, "count": count}
        texts += english_captions(attrs, len(demo._EN_TEMPLATES), rng)
        texts += chinese_captions(attrs, len(demo._ZH_TEMPLATES), rng)
    for _, name_en, name_zh in demo.class_names():
        texts += [t.format(name_en) for t in demo.ZERO_SHOT_TEMPLATES_EN]
        texts += [t.format(name_zh) for t in demo.ZERO_SHOT_TEMPLATES_ZH]
    assert _texts_with_unk(tokenizer, texts) == []


def test_chinese_is_split_into_characters_and_unseen_words_fall_back(tokenizer):
    assert tokenizer.tokenize("左边有一个小的红色圆形") == list("左边有一个小的红色圆形")
    pieces = tokenizer.tokenize("zebra")
    assert "[UNK]" not in pieces and pieces[0] == "z" and all(p.startswith("##") for p in pieces[1:])


def test_lowercase_flag(tokenizer):
    assert tokenizer.tokenize("A Red CIRCLE") == ["a", "red", "circle"]
    cased = build_tokenizer(demo_vocab_path(), lowercase=False)
    assert cased.tokenize("Red") != ["red"]


def test_tokenize_pads_truncates_and_masks(tokenizer):
    out = tokenize(tokenizer, ["a red circle", "two large blue squares at the top of the picture"], max_length=8)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert set(out) == {"input_ids", "attention_mask"}
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == torch.long
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ids[0].tolist() == [cls] + tokenizer.convert_tokens_to_ids(["a", "red", "circle"]) + [sep, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert ids[1, 0] == cls and ids[1, -1] == sep and mask[1].all()  # truncated, still ends with [SEP]
    assert ids[1, 1:4].tolist() == tokenizer.convert_tokens_to_ids(["two", "large", "blue"])
    empty = tokenize(tokenizer, [], max_length=8)
    assert empty["input_ids"].shape == (0, 8)


def test_tokenize_rejects_bad_input(tokenizer):
    with pytest.raises(ConfigError, match=r"texts\[1\]"):
        tokenize(tokenizer, ["ok", None], max_length=8)
    with pytest.raises(ConfigError, match="max_length"):
        tokenize(tokenizer, ["ok"], max_length=1)


def test_vocab_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="never downloads"):
        build_tokenizer(tmp_path / "missing.txt")
    bad = tmp_path / "vocab.txt"
    bad.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\nred\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[PAD\] is on line 2"):
        build_tokenizer(bad)
    bad.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nred\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[MASK\]"):
        build_tokenizer(bad)
    bad.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nred\nred\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 7 repeats"):
        build_tokenizer(bad)
