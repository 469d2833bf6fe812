"""The ConfigMaps that carry the project's conf/ into the cluster (k8s/base/conf-configmaps.yaml).

kustomize refuses files outside its root, so a ``configMapGenerator`` cannot read ``conf/base``. The ConfigMaps
are therefore generated from conf/ by this module and committed; ``tests/k8s`` fails, naming the command below,
when they no longer match conf/::

    python -m vlalign.launch.confmap            # rewrite k8s/base/conf-configmaps.yaml from conf/base and conf/k8s
    python -m vlalign.launch.confmap --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from vlalign.errors import ConfigError

CONF_ENVS = ("base", "k8s")  # the Kedro environments the pipeline pods mount (/app/conf/<env>)
CONF_SUFFIXES = (".yml", ".yaml", ".json")  # what Kedro's config loader reads; READMEs stay out
OUTPUT = Path("k8s/base/conf-configmaps.yaml")
HEADER = (
    "# GENERATED from conf/{envs} by `python -m vlalign.launch.confmap`: do not edit; edit conf/ and re-run it.\n"
    "# Mounted by the pipeline pods at /app/conf/<env> (k8s/base/pipeline-cronjobs.yaml).\n"
)


def configmap_name(env: str) -> str:
    """ConfigMap name of one Kedro environment."""
    return f"vlalign-conf-{env.replace('_', '-')}"


def conf_configmaps(conf_root: str | Path = "conf", envs: tuple[str, ...] = CONF_ENVS) -> list[dict]:
    """One ConfigMap per environment: file name -> file text, for the config files directly in conf/<env>/."""
    conf_root = Path(conf_root)
    maps = []
    for env in envs:
        folder = conf_root / env
        if not folder.is_dir():
            raise ConfigError(f"{folder}: Kedro environment folder not found; the pipeline pods mount conf/{env}.")
        nested = [p for p in folder.rglob("*") if p.is_file() and p.parent != folder and p.suffix in CONF_SUFFIXES]
        if nested:
            raise ConfigError(
                f"{nested[0]}: a ConfigMap is flat, so conf/{env} cannot have config files in sub-folders; "
                "move it up or extend vlalign.launch.confmap."
            )
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CONF_SUFFIXES)
        maps.append({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": configmap_name(env),
                "labels": {"app.kubernetes.io/name": "vlalign", "app.kubernetes.io/component": "conf"},
                "annotations": {"vlalign.dev/source": f"conf/{env}"},
            },
            "data": {p.name: p.read_text(encoding="utf-8") for p in files},
        })
    return maps


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks so the generated file reads like the conf files."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def render_conf_configmaps(conf_root: str | Path = "conf", envs: tuple[str, ...] = CONF_ENVS) -> str:
    """The text of k8s/base/conf-configmaps.yaml."""
    docs = conf_configmaps(conf_root, envs)
    body = yaml.dump_all(docs, Dumper=_LiteralDumper, sort_keys=False, allow_unicode=True, width=120)
    return HEADER.format(envs=",".join(envs)) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlalign.launch.confmap", description=__doc__.splitlines()[0])
    parser.add_argument("--conf", default="conf", help="the project's conf/ folder (default: %(default)s)")
    parser.add_argument("--output", default=str(OUTPUT), help="file to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = parser.parse_args(argv)
    text = render_conf_configmaps(args.conf)
    output = Path(args.output)
    if args.check:
        current = output.read_text(encoding="utf-8") if output.is_file() else ""
        if current != text:
            print(f"{output} does not match {args.conf}/; run: python -m vlalign.launch.confmap", file=sys.stderr)
            return 1
        print(f"{output} is up to date")
        return 0
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
