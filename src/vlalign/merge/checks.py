"""Which checkpoints may be merged: the same architecture, and a shared initialisation.

Weight averaging (WiSE-FT interpolation, SPHINX's real/synthetic mixing, model soups) is meaningful only between
models that started from the same weights: a model and one fine-tuned from it, or several fine-tunes of the same
model. Two independently initialised networks are permutations of each other at best; their average is noise. Both
facts are in every checkpoint the training loop writes:

* ``model_config``: the architecture (:func:`architecture_signature` keeps the fields that shape the weights);
* the weights a stage started from: ``inputs.init_weights_sha256`` (the init checkpoint's weights) or, for a
  stage from fresh weights, ``start_weights_sha256`` (its weights before the first step), both hashed with
  :func:`vlalign.train.loop.weights_fingerprint`, which also hashes a checkpoint's own final weights.

Two checkpoints are *related* when they started from the same weights, or when one started from the other's final
weights (a stage and its fine-tune), or when they hold the same weights. :func:`check_mergeable` requires every pair of the inputs to be related and
raises :class:`~vlalign.errors.IncompatibleCheckpointsError` naming both checkpoints otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlalign.errors import IncompatibleCheckpointsError

#: Model-config fields that do not shape the weights (names, initial values, augmentation, dropout, pretrained
#: weight files read only at initialisation): checkpoints that differ only in them have the same architecture.
IGNORED_MODEL_FIELDS = (
    "name", "init_temperature", "max_logit_scale", "init_logit_bias", "image.max_shift", "image.weights",
    "image.weights_match", "text.dropout", "text.pretrained",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        out[f"{prefix}.length"] = len(value)
        return out
    return {prefix: value}


def architecture_signature(model_config: dict[str, Any]) -> dict[str, Any]:
    """The model config's fields that shape the weights, flattened to dotted keys (``image.timm_name``, ...)."""
    flat = _flatten(model_config)
    ignored = set(IGNORED_MODEL_FIELDS)
    return {k: v for k, v in flat.items()
            if k not in ignored and not any(k.startswith(f"image.extra_backbones[") and k.endswith(f".{f}")
                                            for f in ("weights", "weights_match"))}


def start_weights(ckpt: dict[str, Any]) -> str | None:
    """sha256 of the weights the checkpoint's stage started from (None when the checkpoint does not record it)."""
    inputs = ckpt.get("inputs") or {}
    return inputs.get("init_weights_sha256") or ckpt.get("start_weights_sha256")


def final_weights(ckpt: dict[str, Any]) -> str:
    """sha256 of the checkpoint's own weights, with the training loop's hash (comparable to :func:`start_weights`)."""
    from vlalign.train.loop import weights_fingerprint

    return str(weights_fingerprint(ckpt))


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "unrecorded"


def check_same_architecture(ckpts: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """Raise :class:`IncompatibleCheckpointsError` naming the first model-config field in which a checkpoint differs
    from the first one."""
    first = architecture_signature(ckpts[0]["model_config"])
    for ckpt, name in zip(ckpts[1:], names[1:]):
        other = architecture_signature(ckpt["model_config"])
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise IncompatibleCheckpointsError(
                    f"cannot merge {names[0]} and {name}: they are different architectures (model_config.{key} is "
                    f"{first.get(key)!r} in {names[0]} but {other.get(key)!r} in {name}). Only checkpoints of the same "
                    "architecture, fine-tuned from the same weights, can be merged."
                )


def related(a: dict[str, Any], b: dict[str, Any], hashes: dict[int, str] | None = None) -> bool:
    """Whether ``a`` and ``b`` started from the same weights, or one started from the other's final weights."""
    hashes = hashes if hashes is not None else {}

    def final(ckpt: dict[str, Any]) -> str:
        if id(ckpt) not in hashes:
            hashes[id(ckpt)] = final_weights(ckpt)
        return hashes[id(ckpt)]

    if a is b:
        return True
    start_a, start_b = start_weights(a), start_weights(b)
    if start_a is not None and start_a == start_b:
        return True
    if (start_b is not None and start_b == final(a)) or (start_a is not None and start_a == final(b)):
        return True
    return final(a) == final(b)  # the same weights (e.g. a one-stage recipe merging its stage with itself)


def check_mergeable(ckpts: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> None:
    """Refuse (with :class:`IncompatibleCheckpointsError`) checkpoints of different architectures, or any pair that
    does not share an initialisation (see the module docstring). Keys and shapes are checked by the merge itself."""
    names = list(names or [f"checkpoint {i}" for i in range(len(ckpts))])
    if len(ckpts) < 2:
        return
    check_same_architecture(ckpts, names)
    hashes: dict[int, str] = {}
    for i in range(len(ckpts)):
        for j in range(i + 1, len(ckpts)):
            if related(ckpts[i], ckpts[j], hashes):
                continue
            a, b = names[i], names[j]
            start_a, start_b = start_weights(ckpts[i]), start_weights(ckpts[j])
            if start_a is None and start_b is None:
                detail = (f"neither records the weights it started from (checkpoints written before vlalign recorded "
                          "start_weights_sha256); retrain them, or merge with check_init=False if you know they share "
                          "an initialisation")
            else:
                detail = (f"{a} started from weights {_short(start_a)} and {b} from {_short(start_b)}, and neither "
                          f"started from the other's final weights ({_short(hashes.get(id(ckpts[i])))} / "
                          f"{_short(hashes.get(id(ckpts[j])))})")
            raise IncompatibleCheckpointsError(
                f"cannot merge {a} and {b}: they do not share an initialisation: {detail}. Averaging independently "
                "initialised models averages unrelated weights; merge a stage with a stage fine-tuned from it "
                "(its `init`), or several fine-tunes of the same stage."
            )
