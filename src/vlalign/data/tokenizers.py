"""WordPiece tokenizers built from a local ``vocab.txt`` (nothing is ever downloaded).

Note on transformers 5.x: ``BertTokenizer`` (and its alias ``BertTokenizerFast``) is backed by the
``tokenizers`` library and takes the vocabulary through its ``vocab`` argument; a ``vocab_file=``
keyword is accepted but silently ignored, leaving a 5-token vocabulary that maps every word to
``[UNK]``. :func:`build_tokenizer` therefore reads the file itself, passes the token->id mapping
explicitly, and checks that the tokenizer really holds it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertTokenizer

from vlalign.errors import ConfigError, WeightsNotFoundError
from vlalign.paths import resolve_path

#: ``pkg:`` spec of the vocabulary shipped with vlalign for the demo dataset.
DEMO_VOCAB_SPEC = "pkg:vlalign/assets/demo_vocab.txt"

#: Special tokens, in the order BERT vocabularies list them; ``[PAD]`` must have id 0.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def demo_vocab_path() -> Path:
    """Return the path of the packaged demo vocabulary ``src/vlalign/assets/demo_vocab.txt``."""
    return resolve_path(DEMO_VOCAB_SPEC)


def _read_vocab(path: Path) -> dict[str, int]:
    """Read a BERT ``vocab.txt`` (one token per line, line index = id) into a token->id dict."""
    try:
        # Split on "\n" only: str.splitlines() would also split on U+2028/U+2029/U+0085, which are
        # tokens of real vocabularies (cn-clip's Chinese BERT vocab.txt lists U+2028 and U+2029).
        lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
        if lines and lines[-1] == "":
            lines.pop()
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsNotFoundError(
            f"{path}: cannot read the vocabulary file ({exc}); expected a UTF-8 text file with one "
            "WordPiece token per line. Point the config at a readable vocab.txt."
        ) from exc
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        if token in vocab:
            raise ConfigError(
                f"{path}: line {index + 1} repeats token {token!r} (first seen on line "
                f"{vocab[token] + 1}); a vocab.txt must list each token once. Remove the duplicate."
            )
        vocab[token] = index
    missing = [tok for tok in SPECIAL_TOKENS if tok not in vocab]
    if missing:
        raise ConfigError(
            f"{path}: the vocabulary lacks the special tokens {missing}; a BERT vocab.txt must contain "
            f"{list(SPECIAL_TOKENS)}. Add them (with [PAD] on the first line)."
        )
    if vocab["[PAD]"] != 0:
        raise ConfigError(
            f"{path}: [PAD] is on line {vocab['[PAD]'] + 1}, expected line 1 (id 0), because "
            "attention masks and padding assume pad id 0. Move [PAD] to the first line."
        )
    return vocab


def build_tokenizer(vocab_file: str | Path, lowercase: bool = True) -> BertTokenizer:
    """Build a WordPiece ``BertTokenizer`` from a local vocabulary file.

    Args:
        vocab_file: path of a BERT ``vocab.txt``; ``pkg:<package>/<file>`` names a file shipped
            in an installed package (see :func:`vlalign.paths.resolve_path`).
        lowercase: lowercase (and strip accents from) the text before WordPiece, as uncased BERT does.

    Chinese characters are split into single characters by the BERT pre-tokenizer, so a
    Chinese vocabulary lists characters, not words.
    """
    path = resolve_path(vocab_file)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{vocab_file!r} resolves to {path}, which is not a file; expected a BERT vocab.txt."
        )
    vocab = _read_vocab(path)
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=lowercase)
    if len(tokenizer) != len(vocab):  # guards against the transformers 5.x vocab_file pitfall
        raise ConfigError(
            f"{path}: the tokenizer holds {len(tokenizer)} tokens but the file lists {len(vocab)}; "
            "the installed transformers version did not take the vocabulary. Check the pinned version."
        )
    return tokenizer


def tokenize(tokenizer: BertTokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into ``[CLS] ... [SEP]`` sequences padded/truncated to ``max_length``.

    Returns ``{"input_ids": (B, L) long, "attention_mask": (B, L) long}`` with ``L == max_length``;
    padding uses the tokenizer's pad id (0 for vocabularies built here) and mask 0.
    """
    if max_length < 2:
        raise ConfigError(
            f"max_length={max_length}: a sequence needs room for at least [CLS] and [SEP]; use max_length >= 2."
        )
    texts = list(texts)
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise ConfigError(
            f"tokenize: texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str "
            f"({len(bad)} non-string entries). Drop or fix missing captions before tokenizing."
        )
    if not texts:
        empty = torch.zeros((0, max_length), dtype=torch.long)  # (0, L)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    encoded = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    input_ids = encoded["input_ids"].long()  # (B, L)
    attention_mask = encoded["attention_mask"].long()  # (B, L)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
