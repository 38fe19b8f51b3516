"""The Lens trainer before and after the CPU fixes, side by side in one run, on the ablation's
scene corpus: steps/s and the prompt-following curve at 2, 5 and 10 minutes of training.

    python bench/lens_bench.py [--minutes 10] [--scenes 2000] [--n 4] [--out runs/bench-lens]
                               [--configs before,after] [--set seed=1 ...]

Makes the ablation's corpus (`recaption scenes`, captioned by the offline analyzer), then for
each configuration trains for the wall time, stopping at 20%, 50% and 100% of it (2, 5 and
10 minutes at the default `--minutes 10`) to score the EMA weights on the held-out prompts in
the dense and the paraphrase style; evaluation time is not training time (the run resumes
from its checkpoint). `before`: `tiny` with the settings the ablation used before (batch 32,
40 caption tokens); `after`: the `cpu` preset (its cosine lr schedule ends with the time
budget, `minutes`, whatever the machine's pace); `fourth_pass`: it with the constant lr the
fourth pass used; `third_pass`, `x_prediction`, `tokens_64`, `deep_narrow`, `heads_8`,
`batch_16`, `batch_64`, `timesteps_mixed`, `shift_07`, `lr_5e-3`, `ninth_pass`,
`positions_rope`, `twelfth_pass`, `mlp_2`, `fifteenth_pass` and `sixteenth_pass`: the settings the
causes ablation measured against it.
Every caption is encoded once before anything is timed. Prints one table and writes
OUT/bench.json. Torch uses the threads it is given (`OMP_NUM_THREADS`, `--threads`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from recaption.lens.config import SOURCE_COLUMNS, LensConfig, load_lens_config
from recaption.lens.eval import evaluate_run
from recaption.lens.prompts import geneval_prompts
from recaption.lens.run import RunDir
from recaption.lens.text import TextEncoder
from recaption.lens.train import train

CONFIGS = {
    "before": ("tiny", ["batch_size=32", "text.max_tokens=40"]),
    "after": ("cpu", []),
    # the fourth pass's preset: constant lr after the warm-up (the fifth pass adds the cosine)
    "fourth_pass": ("cpu", ["lr_schedule=constant"]),
    # the third pass's preset, and it with x-prediction (docs/ablation/causes.md)
    "third_pass": ("cpu", ["timesteps=uniform", "loss_weight=x0"]),
    "x_prediction": ("cpu", ["timesteps=uniform", "loss_weight=x0", "model.prediction=x0"]),
    # the sixth pass: every caption's third object within the token budget
    "tokens_64": ("cpu", ["text.max_tokens=64"]),
    # the seventh pass: deeper and narrower at about the same parameters, for binding
    "deep_narrow": ("cpu", ["model.width=96", "model.depth=6"]),
    # the eighth pass: twice the attention heads (16 channels each), for binding
    "heads_8": ("cpu", ["model.heads=8"]),
    # the eighth pass: half the batch, so twice the steps in the same time
    "batch_16": ("cpu", ["batch_size=16"]),
    # the ninth pass: twice the batch (half the steps, a less noisy gradient)
    "batch_64": ("cpu", ["batch_size=64"]),
    # the ninth pass: half the timesteps uniform, for the noisy end where layout is decided
    "timesteps_mixed": ("cpu", ["timesteps=mixed"]),
    # the ninth pass: the other way, timesteps shifted towards the clean end (SD3's shift < 1)
    "shift_07": ("cpu", ["timestep_shift=0.7"]),
    # the ninth pass: a higher peak lr under the cosine (gradient norms fall well under the clip)
    "lr_5e-3": ("cpu", ["lr=5e-3"]),
    # the preset before the tenth pass fitted the patches' position frequencies to the grid
    # (`after` was this in bench-tenth.json, and `positions_grid` the preset now)
    "ninth_pass": ("cpu", ["model.positions=dit"]),
    # the tenth pass: 2-D rotary positions in the attention as well
    "positions_rope": ("cpu", ["model.positions=rope"]),
    # the preset before the thirteenth pass: AdamW for every weight, logit-normal unshifted
    "twelfth_pass": ("cpu", ["optimizer=adamw", "timestep_shift=1.0"]),
    # the fifteenth pass: MLPs half as wide (1.16x the steps a second; the caption places
    # the shapes on every run measured, the kinds come out worse)
    "mlp_2": ("cpu", ["model.mlp_ratio=2"]),
    # the preset before the sixteenth pass: caption tokens unmixed, timesteps shifted by 1.5
    "fifteenth_pass": (
        "cpu",
        ["model.text_mix=0", "timestep_shift=1.5", "model.text_depth=null"],
    ),
    # the preset before the seventeenth pass: the caption's tokens updated in every block but
    # the last
    "sixteenth_pass": ("cpu", ["model.text_depth=null"]),
}
MARKS = (0.2, 0.5, 1.0)  # of --minutes: 2, 5 and 10 minutes at the default


def make_corpus(out: Path, scenes: int) -> Path:
    """The ablation's corpus: scenes captioned by the offline analyzer (skipped if there)."""
    corpus = out / "corpus"
    if not (corpus / "manifest.json").exists():
        from recaption.config import load_config
        from recaption.pipeline import run
        from recaption.samples import write_scenes

        t0 = time.perf_counter()
        write_scenes(out / "scenes", scenes, seed=0)
        cfg = load_config("default", [f"input.path={out / 'scenes'}", f"output.path={corpus}"])
        run(cfg, show_progress=False)
        print(f"corpus: {scenes} scenes drawn and captioned in {time.perf_counter() - t0:.0f} s")
    return corpus


def train_seconds(run_dir: Path) -> float:
    """Seconds the run has spent in training steps, from its metrics (0 before it starts)."""
    rows = RunDir(run_dir).read_metrics()
    done = [0, *(r["step"] for r in rows)]
    return sum(
        (b - a) / r["steps_per_s"] for a, b, r in zip(done[:-1], done[1:], rows, strict=True)
    )


def warm_text_cache(corpus: Path, cfg: LensConfig, cache: Path) -> None:
    """Encode every caption the config trains on before anything is timed. Text features
    are cached per caption, so a run's first pass over its corpus is MiniLM's too (~45% of
    a step): unwarmed, the first config of a bench paid in its timed minutes for the
    captions the later ones found cached."""
    columns = [SOURCE_COLUMNS[s] for s, share in cfg.data.caption_mix.items() if share > 0]
    table = pq.read_table(corpus / "data", columns=columns)
    captions = sorted({c for col in columns for c in table.column(col).to_pylist() if c})
    encoder = TextEncoder(cfg.text, cache, torch.device("cpu"))
    for i in range(0, len(captions), 256):
        encoder(captions[i : i + 256])


def bench_config(
    name: str, corpus: Path, out: Path, minutes: float, n: int, extra: list[str]
) -> dict:
    preset, settings = CONFIGS[name]
    settings = [*settings, *extra]
    run_dir, cache = out / name, out / "text-cache"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: never resume an earlier bench's
    warm_text_cache(corpus, load_lens_config(preset, settings), cache)
    # The time budget ends the run and its lr schedule together (`minutes`: the cosine
    # follows the training clock), so every config anneals by its last mark at any pace. A
    # stop writes a sample grid: keep it cheap, it is counted as training time.
    fixed = [f"minutes={minutes}", "steps=10000000", "sample.every=0", "sample.per_prompt=1"]
    cfg = load_lens_config(preset, [*settings, *fixed, "sample.steps=4"])
    points = []
    for mark in MARKS:
        # training time is the steps' own time (metrics), not start-up, sampling or scoring;
        # the last mark is the budget's own end
        budget = mark * minutes * 60 - train_seconds(run_dir) if mark < 1 else None
        summary = train(
            str(corpus), cfg, run_dir, cache_dir=cache, progress=False, max_seconds=budget
        )
        result = evaluate_run(
            run_dir, geneval_prompts(), n, 4.0, 20, ("dense", "paraphrase"), cache_dir=cache
        )
        points.append(
            {
                "minutes": round(train_seconds(run_dir) / 60, 2),
                "step": summary.steps,
                "dense": result["dense"]["overall"],
                "paraphrase": result["paraphrase"]["overall"],
                "dense_categories": result["dense"]["categories"],
            }
        )
        print(f"  {name}: {points[-1]}", flush=True)
    rows = RunDir(run_dir).read_metrics()
    warm = [r["steps_per_s"] for r in rows if r["epoch"] > 0] or [r["steps_per_s"] for r in rows]
    return {
        "preset": preset,
        "settings": settings,
        "batch_size": cfg.batch_size,
        "lr_schedule": cfg.lr_schedule,
        "steps_per_s": float(np.mean(warm)),
        "samples_per_s": float(np.mean(warm)) * cfg.batch_size,
        "points": points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time per config")
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--n", type=int, default=4, help="images per prompt at each mark")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default="runs/bench-lens")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every config, e.g. seed=1 (repeatable)",
    )
    parser.add_argument(
        "--configs", default="before,after", help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    args = parser.parse_args()
    names = args.configs.split(",")
    if bad := [n for n in names if n not in CONFIGS]:
        parser.error(f"unknown config {bad[0]!r}; choose from {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    corpus = make_corpus(out, args.scenes)
    results = {
        name: bench_config(name, corpus, out, args.minutes, args.n, args.set) for name in names
    }
    print(f"\nLens trainer, {torch.get_num_threads()} threads, {args.minutes:g} min per config:")
    print(
        "| config | steps/s | samples/s | "
        + " | ".join(
            f"{style} @ {m * args.minutes:g} min"
            for style in ("dense", "paraphrase")
            for m in MARKS
        )
        + " |"
    )
    print("| --- " * (3 + 2 * len(MARKS)) + "|")
    for name, r in results.items():
        cells = [
            f"{p[style]:.2f} (step {p['step']})"
            for style in ("dense", "paraphrase")
            for p in r["points"]
        ]
        print(
            f"| {name} ({r['preset']}) | {r['steps_per_s']:.2f} | {r['samples_per_s']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    record = {
        "minutes": args.minutes,
        "threads": torch.get_num_threads(),
        "n": args.n,
        "configs": results,
    }
    (out / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
