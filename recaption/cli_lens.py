"""`recaption lens ...`: the bundled minimal Lens trainer's commands (train, sample, eval).
torch is imported only inside the commands (`pip install 'recaption[train]'`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recaption.errors import ConfigError


def cmd_lens_train(args: argparse.Namespace) -> int:
    from recaption.lens.config import load_lens_config

    overrides = list(args.set)
    for key in ("steps", "minutes", "device", "batch_size"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    cfg = load_lens_config(args.config, overrides)
    from recaption.lens.train import train  # torch: imported only when training

    out = args.out or f"runs/lens-{cfg.name}"
    summary = train(
        args.corpus,
        cfg,
        out,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
    )
    for line in summary.lines():
        print(f"recaption lens: {line}")
    return 0


def cmd_lens_sample(args: argparse.Namespace) -> int:
    from recaption.lens.sample import sample_to_files

    prompts = list(args.prompt)
    if args.prompts:
        try:
            prompts += [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
        except OSError as exc:
            raise ConfigError(f"cannot read --prompts {args.prompts}: {exc.strerror}") from None
    if not prompts:
        raise ConfigError("give at least one --prompt (or --prompts FILE)")
    if args.n < 1 or args.steps < 1:
        raise ConfigError("--n and --steps must be at least 1")
    written = sample_to_files(
        args.run,
        prompts,
        Path(args.out),
        args.n,
        args.cfg,
        args.steps,
        args.seed,
        args.device,
        args.cache_dir,
    )
    print(f"recaption lens: wrote {len(written) - 1} images and {written[-1]}")
    return 0


def cmd_lens_eval(args: argparse.Namespace) -> int:
    import json

    from recaption.lens.eval import STYLES, detector_accuracy, evaluate_run, table
    from recaption.lens.prompts import geneval_prompts, read_prompts
    from recaption.lens.run import RunDir

    try:
        prompts = read_prompts(Path(args.prompts)) if args.prompts else geneval_prompts()
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read --prompts {args.prompts}: {exc}") from None
    if args.n < 1 or args.steps < 1:
        raise ConfigError("--n and --steps must be at least 1")
    styles = tuple(args.styles.split(","))
    if bad := [s for s in styles if s not in STYLES]:
        raise ConfigError(f"unknown prompt style {bad[0]!r}: {', '.join(STYLES)}")
    if "paraphrase" in styles and not all(p.paraphrases for p in prompts):
        raise ConfigError("the paraphrase style needs prompts with paraphrases")
    result = evaluate_run(
        args.run, prompts, args.n, args.cfg, args.steps, styles, args.device, args.cache_dir
    )
    size = RunDir(args.run).read_config()["config"]["model"]["image_size"]
    result["detector"] = detector_accuracy(prompts, size)
    for style in styles:
        print(f"prompts in the {style} style ({args.n} images each):")
        print(table({Path(args.run).name: result}, style))
    d = result["detector"]
    print(
        f"recaption lens: detector reads {d['scenes_exact']:.1%} of {d['scenes']} real scenes "
        f"exactly; {d['prompts_pass']:.0%} of the prompts pass on the scenes they describe"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"recaption lens: wrote {args.json}")
    return 0


def add_lens_commands(sub: Any) -> None:
    """`recaption lens train|sample|eval` under the top-level subparsers `sub`."""
    about = (
        "the bundled minimal Lens trainer (needs the train extra: pip install 'recaption[train]')"
    )
    lens = sub.add_parser("lens", help=about, description=about).add_subparsers(
        dest="lens_command", required=True
    )
    p = lens.add_parser("train", help="train a small MMDiT on a corpus (resumes a killed run)")
    p.add_argument("--corpus", required=True, help="corpus folder or URI (s3://...)")
    p.add_argument(
        "--config",
        default="tiny",
        help="preset: cpu (the fastest learner on a CPU), tiny (as it was) or small (one GPU)",
    )
    p.add_argument("--out", help="run folder (default runs/lens-CONFIG)")
    p.add_argument("--steps", type=int)
    p.add_argument(
        "--minutes",
        type=float,
        help="a time budget: the run and its lr schedule end after this many minutes of "
        "training (or at --steps, whichever comes first)",
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="pause after this long, with a checkpoint to resume (the schedule goes on)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cache-dir", type=Path, help="text feature cache (~/.cache/recaption/text)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_lens_train)

    p = lens.add_parser("sample", help="draw images for prompts from a trained run")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/lens-tiny")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file of prompts, one a line")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=32, help="Euler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="samples")
    p.add_argument("--cache-dir", type=Path, help="text feature cache (~/.cache/recaption/text)")
    p.set_defaults(func=cmd_lens_sample)

    p = lens.add_parser("eval", help="GenEval-style prompt following, scored by a shape detector")
    p.add_argument("--run", required=True)
    p.add_argument("--prompts", help="prompts JSONL (default: the built-in held-out set)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument(
        "--styles",
        default="short,dense",
        help="prompt styles: short, upsampled (short through the upsampler), dense, paraphrase",
    )
    p.add_argument("--json", help="write the result to this file")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, help="text feature cache (~/.cache/recaption/text)")
    p.set_defaults(func=cmd_lens_eval)
