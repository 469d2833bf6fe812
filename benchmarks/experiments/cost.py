"""What each shipped recipe costs per step: the stage that trains everything, at the recipe's batch size, on CPU.

Each recipe is measured in its own fresh process (so the peak resident memory is the recipe's alone): its last stage
that trains every parameter (e.g. ``stage2``; ``blip``'s and ``sphinx``'s first such stage) runs ``--short`` and
then ``--long`` optimizer steps from fresh weights on the built-in data; the difference of the two wall times over
the difference of the steps is the steady-state seconds per step (set-up, data loading into RAM and the first steps
cancel). Also recorded: parameters (all, and trainable in that stage), and the process's peak RSS. The figures are
for this machine's CPU and thread count, which the JSON records; compare recipes with each other, not machines.

    .venv/bin/python benchmarks/experiments/cost.py                 # about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def worker(recipe: str, short: int, long: int, batch_size: int | None, data_root: str) -> dict:
    from vlalign.train import CheckpointStore, train_stage

    data = common.corpus("default", data_root)
    cfg, stages, _ = common.recipe_stages(recipe, common.Budget(steps=long, batch_size=batch_size or 64))
    stage, _ = next((s, w) for s, w in stages if s.trainable == ["all"])
    rows = data.train_rows("en")
    walls = {}
    for steps in (short, long):
        st = stage.__class__.from_dict({**stage.to_dict(), "max_steps": steps, "warmup_steps": 1})
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            ckpt = train_stage(cfg, st, rows, None, CheckpointStore(Path(tmp) / st.name))
            walls[steps] = time.perf_counter() - start
    import torch

    model = ckpt["model"]
    return {"recipe": recipe, "stage": stage.name, "objective": stage.objective, "arch": cfg.arch,
            "batch_size": stage.batch_size, "s_per_step": (walls[long] - walls[short]) / (long - short),
            "params": common.params_of(ckpt),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "tensors": len(model)}


def main(argv: list[str] | None = None) -> int:
    _, training = common.training_conf()
    names = list(training["recipes"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=names, choices=names)
    parser.add_argument("--short", type=int, default=3)
    parser.add_argument("--long", type=int, default=13)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64, the recipes' batch size")
    parser.add_argument("--data-root", default=str(common.ROOT / "data" / "01_raw" / "experiments"))
    parser.add_argument("--out", default=str(common.RESULTS / "cost.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.short, args.long, args.batch_size, args.data_root)))
        return 0
    rows = []
    for recipe in args.recipes:
        cmd = [sys.executable, __file__, "--worker", recipe, "--short", str(args.short), "--long", str(args.long),
               "--data-root", args.data_root] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{recipe}: the cost worker failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{recipe:12s} {rows[-1]['s_per_step']:.3f} s/step  {rows[-1]['params'] / 1e6:.2f} M params  "
              f"{rows[-1]['peak_rss_mib']:.0f} MiB peak RSS")
    from vlalign import reproducibility

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"host": reproducibility.describe_host(), "short": args.short,
                                          "long": args.long, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
