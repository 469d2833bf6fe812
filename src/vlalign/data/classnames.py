"""ImageNet-1k class names and CLIP prompt templates, in English and Chinese, from installed packages.

- English: ``open_clip/zero_shot_metadata.py`` of ``open-clip-torch`` (``IMAGENET_CLASSNAMES``, 1,000
  names in the standard sorted-wnid order; ``OPENAI_IMAGENET_TEMPLATES``, the 80 OpenAI CLIP templates).
- Chinese: ``cn_clip/eval/imagenet_zeroshot_templates.py`` of ``cn-clip`` (``imagenet_classnames``, 1,000
  names in the same order; ``openai_imagenet_template``, 80 Chinese templates).
- :func:`chinese_bert_vocab_path`: ``cn_clip/clip/vocab.txt``, the 21,128-token Chinese BERT vocabulary.

The metadata files are executed on their own (they import nothing), so neither package's heavy
``__init__`` (open_clip needs ftfy, cn_clip needs lmdb) is imported; both are installed with ``--no-deps``.
Templates are returned as strings with ``{}`` where the class name goes.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

from vlalign.errors import ConfigError, WeightsNotFoundError

#: Where each language's metadata lives: (import name, pip name, file, classnames attr, templates attr).
_SOURCES = {
    "en": ("open_clip", "open-clip-torch", "zero_shot_metadata.py", "IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES"),
    "zh": ("cn_clip", "cn-clip", "eval/imagenet_zeroshot_templates.py", "imagenet_classnames", "openai_imagenet_template"),
}
#: ``pkg:`` spec of the Chinese BERT vocabulary shipped in cn-clip.
CHINESE_BERT_VOCAB_SPEC = "pkg:cn_clip/clip/vocab.txt"


def _package_file(package: str, pip_name: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"Python package {package!r} is not installed; it ships the ImageNet class names/templates or "
            f"vocabulary vlalign reads. Install it with `pip install --no-deps {pip_name}` (or `make setup`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: not found in the installed {pip_name}; expected {relative} there. Install the version "
            "pinned in the Makefile."
        )
    return path


@functools.lru_cache(maxsize=None)
def _metadata(lang: str) -> ModuleType:
    if lang not in _SOURCES:
        raise ConfigError(f"ImageNet class names/templates: lang={lang!r}; expected one of {sorted(_SOURCES)}.")
    package, pip_name, relative, _, _ = _SOURCES[lang]
    path = _package_file(package, pip_name, relative)
    spec = importlib.util.spec_from_file_location(f"_vlalign_imagenet_metadata_{lang}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a plain data module: lists/tuples of strings and lambdas
    return module


def imagenet_classnames(lang: str = "en") -> list[str]:
    """The 1,000 ImageNet-1k class names (index i = class i in sorted-wnid order) in ``lang`` (en/zh)."""
    names = list(getattr(_metadata(lang), _SOURCES[lang][3]))
    if len(names) != 1000:
        raise ConfigError(f"{_SOURCES[lang][1]} lists {len(names)} ImageNet class names; expected 1000.")
    return names


def imagenet_templates(lang: str = "en") -> list[str]:
    """The 80 OpenAI CLIP prompt templates in ``lang`` (en/zh), with ``{}`` for the class name."""
    templates = [t("{}") if callable(t) else str(t) for t in getattr(_metadata(lang), _SOURCES[lang][4])]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(f"{_SOURCES[lang][1]}: template {bad[0]!r} has no place for the class name.")
    return templates


def chinese_bert_vocab_path() -> Path:
    """Path of cn-clip's Chinese BERT ``vocab.txt`` (21,128 WordPiece tokens)."""
    return _package_file("cn_clip", "cn-clip", "clip/vocab.txt")
