"""`make ablation`: the Lens thesis in miniature, offline on a CPU.

scenes ─▶ web shards ─▶ recaption (analyzer) ─▶ caption fidelity
                                  └─▶ the same trainer, config and steps on four caption
                                      mixes (alt text, dense, short, 95/5 dense/alt), dense and
                                      alt on several seeds
                                      ─▶ GenEval-style eval in four prompt styles: short,
                                         short through the upsampler, dense, paraphrase
                                      ─▶ OUT/report.md, results.json, accuracy.png, loss.png

    python -m recaption.ablation [--out runs/ablation] [--scenes 2000] [--steps 1280]

Every stage is skipped when its output exists, so a stopped ablation resumes where it was.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from recaption.corpus import MANIFEST

# On top of the preset for every arm (none since the `cpu` preset holds what the CPU needs)
SETTINGS: list[str] = []
ARMS: dict[str, dict[str, float]] = {
    "alt": {"alt": 1.0},
    "dense": {"dense": 1.0},
    "short": {"short": 1.0},
    "dense95_alt5": {"dense": 0.95, "alt": 0.05},
}
STYLE_TITLES = {
    "short": 'GenEval\'s short prompts ("a photo of a red triangle"), as written',
    "upsampled": "The short prompts through the prompt upsampler (`recaption/lens/upsample.py`)",
    "dense": "The prompts in the analyzer's dense-caption style (its own template)",
    "paraphrase": "Paraphrases: three wordings a prompt that share no template with the captions",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recaption.ablation", description=__doc__)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--scenes", type=int, default=2000)
    # the ablation must fit 40 minutes on 2 cores: with 1,280 steps of the seventeenth pass's
    # preset (its caption only lends keys and values: 1.34x the steps a second) it took 36.2
    # minutes from a fresh clone, with 960 of the sixteenth's 33.5
    p.add_argument("--steps", type=int, default=1280, help="training steps of every arm")
    # dense and alt first: their seeds are what the thesis needs if a run is cut short
    p.add_argument(
        "--arms", default="dense,alt,short,dense95_alt5", help=f"some of {', '.join(ARMS)}"
    )
    p.add_argument("--seeds", type=int, default=2, help="seeds of the --seeded arms")
    p.add_argument("--seeded", default="dense,alt", help="arms trained on every seed")
    p.add_argument("--styles", default="short,upsampled,dense,paraphrase")
    p.add_argument("--config", default="cpu")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"after {SETTINGS}"
    )
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--euler", type=int, default=20, help="Euler steps per image")
    p.add_argument("--seed", type=int, default=0, help="the scenes' seed and the first arm seed")
    p.add_argument("--detector-scenes", type=int, default=1000, help="scenes the detector reads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bad := [a for a in args.arms.split(",") if a not in ARMS]:
        print(f"ablation: unknown arm {bad[0]!r}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str):
        print(f"ablation: {name}", flush=True)
        return time.perf_counter()

    from recaption.fidelity import evaluate as fidelity
    from recaption.samples import write_scenes

    scenes, corpus = out / "scenes", out / "corpus"
    t = stage(f"{args.scenes} scenes -> {scenes}")
    if not (scenes / "truth.jsonl").exists():
        write_scenes(scenes, args.scenes, seed=args.seed)
    timings["scenes"] = time.perf_counter() - t

    t = stage(f"recaption with the analyzer -> {corpus}")
    if not (corpus / MANIFEST).exists():
        from recaption.config import load_config
        from recaption.pipeline import run

        cfg = load_config("default", [f"input.path={scenes}", f"output.path={corpus}"])
        if run(cfg, show_progress=False).failed:
            print("ablation: captioning failed; see above", file=sys.stderr)
            return 1
    timings["captioning"] = time.perf_counter() - t
    fid = fidelity(corpus, scenes)
    (out / "fidelity.json").write_text(json.dumps(fid, indent=2) + "\n")

    from recaption.lens.config import load_lens_config
    from recaption.lens.eval import STYLES, blind_accuracy, detector_accuracy, evaluate_run
    from recaption.lens.prompts import geneval_prompts
    from recaption.lens.train import train

    styles = tuple(args.styles.split(","))
    if bad := [s for s in styles if s not in STYLES]:
        print(
            f"ablation: unknown style {bad[0]!r}; choose from {', '.join(STYLES)}", file=sys.stderr
        )
        return 2
    prompts = geneval_prompts()
    results: dict[str, dict[int, dict]] = {}
    cache = out / "text-cache"
    seeded = set(args.seeded.split(","))
    for arm in args.arms.split(","):
        mix = json.dumps(ARMS[arm])
        seeds = range(args.seed, args.seed + (args.seeds if arm in seeded else 1))
        for seed in seeds:
            run_dir = out / arm / f"seed{seed}"
            overrides = [*SETTINGS, *args.set, f"steps={args.steps}", f"seed={seed}"]
            overrides.append("sample.every=0")
            cfg = load_lens_config(args.config, [*overrides, f"data.caption_mix={mix}"])
            t = stage(f"train {arm} ({mix}), seed {seed}, {args.steps} steps")
            train(str(corpus), cfg, run_dir, cache_dir=cache, progress=False)
            timings[f"train {arm} seed {seed}"] = time.perf_counter() - t
            t = stage(f"evaluate {arm} seed {seed}")
            result_path = run_dir / "eval.json"
            if not result_path.exists():
                result = evaluate_run(
                    run_dir, prompts, args.n, args.cfg, args.euler, styles, cache_dir=cache
                )
                result_path.write_text(json.dumps(result, indent=2) + "\n")
            results.setdefault(arm, {})[seed] = json.loads(result_path.read_text())
            timings[f"evaluate {arm} seed {seed}"] = time.perf_counter() - t

    image_size = load_lens_config(args.config, [*SETTINGS, *args.set]).model.image_size
    detector = detector_accuracy(prompts, image_size, args.detector_scenes)
    blind = blind_accuracy(prompts, image_size, args.n)
    report = write_report(out, args, styles, fid, detector, blind, results, timings, argv)
    print(report.read_text())
    print(f"ablation: wrote {report}")
    return 0


def summarise(per_seed: dict[int, dict], style: str) -> dict:
    """Mean over seeds per category and overall, with the spread (min, max, sd) of overall."""
    from recaption.lens.prompts import CATEGORIES

    runs = [r[style] for r in per_seed.values()]
    overall = [r["overall"] for r in runs]
    return {
        "categories": {
            c: float(np.mean([r["categories"][c] for r in runs]))
            for c in CATEGORIES
            if all(c in r["categories"] for r in runs)
        },
        "overall": float(np.mean(overall)),
        "min": float(min(overall)),
        "max": float(max(overall)),
        "sd": float(np.std(overall, ddof=1)) if len(overall) > 1 else 0.0,
        "seeds": len(overall),
        "per_seed": overall,
    }


def accuracy_table(summary: dict[str, dict], blind: dict | None) -> str:
    from recaption.lens.prompts import CATEGORIES

    lines = [
        "| arm | seeds | " + " | ".join(CATEGORIES) + " | overall (mean) | spread over seeds |",
        "| --- | --- |" + " --- |" * (len(CATEGORIES) + 2),
    ]
    for arm, s in summary.items():
        cells = [f"{s['categories'].get(c, float('nan')):.2f}" for c in CATEGORIES]
        spread = (
            f"{s['min']:.2f}–{s['max']:.2f} (sd {s['sd']:.2f})" if s["seeds"] > 1 else "one seed"
        )
        lines.append(
            f"| {arm} | {s['seeds']} | "
            + " | ".join(cells)
            + f" | **{s['overall']:.2f}** | {spread} |"
        )
    if blind is not None:
        cells = [f"{blind['categories'].get(c, float('nan')):.2f}" for c in CATEGORIES]
        lines.append(
            "| *prompt-blind: training scenes* | – | "
            + " | ".join(cells)
            + f" | {blind['overall']:.2f} | – |"
        )
    return "\n".join(lines)


def write_report(
    out: Path,
    args: argparse.Namespace,
    styles: tuple[str, ...],
    fid: dict,
    detector: dict,
    blind: dict,
    results: dict[str, dict[int, dict]],
    timings: dict[str, float],
    argv: list[str] | None,
) -> Path:
    from recaption.fidelity import table as fidelity_table

    summary = {
        style: {arm: summarise(per_seed, style) for arm, per_seed in results.items()}
        for style in styles
    }
    plot_accuracy(out / "accuracy.png", summary)
    plot_losses(out / "loss.png", results, out)
    total = sum(timings.values())
    command = "python -m recaption.ablation " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = {
        "command": command,
        "args": vars(args),
        "styles": list(styles),
        "summary": summary,
        "results": {arm: {str(k): v for k, v in r.items()} for arm, r in results.items()},
        "prompt_blind": blind,
        "detector": detector,
        "fidelity": fid,
        "timings_s": timings,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    seeded = ", ".join(a for a in results if len(results[a]) > 1) or "none"
    lines = [
        "# Dense captions vs alt text: the ablation",
        "",
        f"{args.scenes} scenes captioned by the offline analyzer; the `{args.config}` trainer, "
        f"{args.steps} steps for every arm, seeds {args.seed}.. ({args.seeds} for {seeded}, one "
        f"for the rest); {args.n} images per prompt and style, CFG {args.cfg}, {args.euler} Euler "
        f"steps. Wall time {total / 60:.1f} min. Reproduce with:",
        "",
        f"    {command}",
        "",
        "Overall is the mean of the six categories (GenEval). The *prompt-blind* row scores "
        "random scenes from the training distribution against the prompts: what a model that "
        "ignores the prompt and draws training-like scenes would get. Raw numbers per seed: "
        "`results.json`.",
        "",
    ]
    for style in styles:
        lines += [
            f"## {STYLE_TITLES[style]}",
            "",
            accuracy_table(summary[style], blind),
            "",
        ]
    lines += [
        "![accuracy per category](accuracy.png)",
        "![loss curves](loss.png)",
        "",
        "## What the captions state (precision / recall against the scenes' ground truth)",
        "",
        fidelity_table(fid),
        "",
        f"Detector check on real scenes at the model's resolution: {detector['scenes_exact']:.1%} "
        f"of {detector['scenes']} scenes read exactly; {detector['prompts_pass']:.0%} of the "
        "prompts pass on the scenes they describe.",
        "",
        "## Wall time",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *(f"| {k} | {v:.0f} |" for k, v in timings.items()),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def plot_accuracy(path: Path, summary: dict[str, dict[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recaption.lens.prompts import CATEGORIES

    styles = list(summary)
    fig, axes = plt.subplots(
        1, len(styles), figsize=(5.2 * len(styles), 3.8), dpi=100, sharey=True, squeeze=False
    )
    for ax, style in zip(axes[0], styles, strict=True):
        arms = summary[style]
        width = 0.8 / max(1, len(arms))
        x = np.arange(len(CATEGORIES) + 1)
        for i, (arm, s) in enumerate(arms.items()):
            values = [s["categories"].get(c, 0.0) for c in CATEGORIES] + [s["overall"]]
            err = np.zeros((2, len(values)))
            err[:, -1] = s["overall"] - s["min"], s["max"] - s["overall"]
            ax.bar(x + i * width, values, width, yerr=err, capsize=2, label=arm)
        ax.set_xticks(x + width * (len(arms) - 1) / 2, [*CATEGORIES, "overall"], rotation=30)
        ax.set_title(f"{style} prompts")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (overall: min–max over seeds)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_losses(path: Path, results: dict[str, dict[int, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recaption.lens.run import RunDir

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for arm, per_seed in results.items():
        for seed in per_seed:
            rows = RunDir(out / arm / f"seed{seed}").read_metrics()
            label = f"{arm} seed {seed}"
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
