"""Resolve local paths, including files shipped inside installed Python packages.

A path string may be:
- a plain filesystem path (``/data/vocab.txt``, ``conf/x.yaml``);
- ``pkg:<package>`` for the folder of an installed package;
- ``pkg:<package>/<relative/file>`` for a file inside it.

Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlalign.errors import WeightsNotFoundError


def resolve_path(spec: str | Path, must_exist: bool = True) -> Path:
    """Return the filesystem path that ``spec`` names, raising a clear error when it is absent."""
    text = str(spec)
    if text.startswith("pkg:"):
        rest = text[len("pkg:"):]
        package, _, relative = rest.partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise WeightsNotFoundError(
                f"{text!r}: Python package {package!r} is not installed; install it "
                f"(e.g. `pip install {package.replace('_', '-')}`) or give a plain path instead."
            )
        base = Path(list(found.submodule_search_locations)[0])
        path = base / relative if relative else base
    else:
        path = Path(text).expanduser()
    if must_exist and not path.exists():
        raise WeightsNotFoundError(
            f"{text!r} resolves to {path}, which does not exist. vlalign never downloads weights or "
            "vocab files: point the config at a local file or folder."
        )
    return path
