"""The causes ablation: one training change at a time, scored at fixed steps.

    python docs/ablation/causes.py CORPUS NAME STEPS[,STEPS...] [KEY=VALUE ...]

Trains `tiny` with the ablation's old settings (batch 32, 40 caption tokens) plus the given
overrides on CORPUS (the ablation's scene corpus, e.g. runs/ablation/corpus), stops at each
step mark to score the EMA weights on the dense-style prompts (4 images a prompt, CFG 4,
20 Euler steps) and appends one JSON line per mark to causes.jsonl beside this file. Steps,
not wall time, are compared: they are robust to a shared machine. Run pinned to one core
(`taskset -c 1`, `OMP_NUM_THREADS=1`) as the committed lines were.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from recaption.lens.config import load_lens_config
from recaption.lens.eval import evaluate_run
from recaption.lens.prompts import geneval_prompts
from recaption.lens.train import train

BEFORE = ["batch_size=32", "text.max_tokens=40"]


def main(corpus: str, name: str, marks: str, *overrides: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out, cache = Path("runs/causes") / name, Path("runs/causes/text-cache")
    for steps in map(int, marks.split(",")):
        cfg = load_lens_config("tiny", [*BEFORE, *overrides, f"steps={steps}", "sample.every=0"])
        summary = train(corpus, cfg, out, cache_dir=cache, progress=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        late = rows[len(rows) // 2 :]
        result = evaluate_run(out, geneval_prompts(), 4, 4.0, 20, ("dense",), cache_dir=cache)
        record = {
            "name": name,
            "steps": steps,
            "ov": list(overrides),
            "s_per_step": round(sum(1 / r["steps_per_s"] for r in late) / len(late), 3),
            "loss_last": round(sum(summary.losses[-50:]) / len(summary.losses[-50:]), 4),
            "dense": round(result["dense"]["overall"], 3),
            "dense_cat": {k: round(v, 2) for k, v in result["dense"]["categories"].items()},
        }
        print(json.dumps(record), flush=True)
        with open(Path(__file__).with_name("causes.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
