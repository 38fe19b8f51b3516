"""`recaption`: one command, with subcommands. Start reading at `cmd_run`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recaption.config import load_config
from recaption.errors import ConfigError, UserError


def cmd_run(args: argparse.Namespace) -> int:
    from recaption.pipeline import run

    overrides = list(args.set)
    if args.input:
        overrides.append(f"input.path={args.input}")
    if args.output:
        overrides.append(f"output.path={args.output}")
    for key in ("shards", "limit", "fraction"):  # a trial run on part of the input
        if getattr(args, key) is not None:
            overrides.append(f"input.{key}={getattr(args, key)}")
    summary = run(load_config(args.pipeline, overrides), show_progress=not args.quiet)
    for line in summary.lines():
        print(f"recaption: {line}")
    return 1 if summary.failed else 0


def cmd_samples(args: argparse.Namespace) -> int:
    from recaption.samples import write_samples

    paths = write_samples(
        Path(args.dir),
        shards=args.shards,
        per_shard=args.per_shard,
        seed=args.seed,
        photo_share=args.photo_share,
    )
    print(f"recaption: wrote {len(paths)} sample shards x {args.per_shard} URLs to {args.dir}")
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    from recaption.samples import write_scenes

    if args.n < 1 or args.per_shard < 1:
        raise ConfigError("--n and --per-shard must be at least 1")
    paths = write_scenes(Path(args.dir), args.n, per_shard=args.per_shard, seed=args.seed)
    print(
        f"recaption: wrote {args.n} scenes in {len(paths)} shards to {args.dir} "
        f"(ground truth: {Path(args.dir) / 'truth.jsonl'})"
    )
    return 0


def cmd_eval_captions(args: argparse.Namespace) -> int:
    import json

    from recaption.fidelity import evaluate, table

    try:
        result = evaluate(Path(args.corpus), Path(args.truth))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(table(result))
    print(f"recaption eval: {result['captioned']} captioned scenes of {result['scenes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"recaption eval: wrote {args.json}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from recaption.report import write_report

    path = write_report(Path(args.corpus), sample=args.sample)
    print(f"recaption: report written to {path}")
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from recaption.download import download

    try:
        totals = download(
            Path(args.urls),
            Path(args.dir),
            url_col=args.url_col,
            caption_col=args.caption_col,
            image_size=args.image_size,
            processes=args.processes,
            threads=args.threads,
            per_shard=args.per_shard,
            timeout_s=args.timeout,
            retries=args.retries,
            distributor=args.distributor,
        )
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise ConfigError(str(exc)) from None
    failed = totals["count"] - totals["successes"]
    why = ", ".join(f"{error} {n}" for error, n in totals.get("errors", {}).items())
    print(
        f"recaption: {totals['count']} URLs in {totals['shards']} shards: "
        f"{totals['successes']} downloaded, {failed} failed" + (f" ({why})" if why else "")
    )
    print(f"recaption: shards in {args.dir}; `recaption run` counts failed URLs as download_failed")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from recaption.estimate import estimate, lines

    overrides = list(args.set) + ([f"input.path={args.input}"] if args.input else [])
    result = estimate(
        load_config(args.pipeline, overrides),
        sample=args.sample,
        dry=args.dry,
        images=args.images,
        output_tokens=args.output_tokens,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in lines(result):
            print(f"recaption: {line}")
    return 0


def cmd_batches(args: argparse.Namespace) -> int:
    import asyncio

    from recaption.captioners.batch_state import batch_table
    from recaption.corpus import CorpusStore

    corpus = CorpusStore(args.corpus)  # for a corpus in a store, its batch ids are staged here
    if not corpus.local.is_dir():
        raise ConfigError(f"no corpus at {args.corpus}")
    manifest = corpus.load_manifest()
    written = list(manifest.shards.values()) if manifest else []
    cost = sum(r.cost_usd for r in written)
    table = batch_table(corpus.batch_states(), len(written), cost, cancel=args.cancel)
    for line in asyncio.run(table):
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from recaption.verify import verify

    verdict = verify(args.corpus, args.input, args.format)
    for line in verdict.notes:
        print(f"recaption verify: note: {line}")
    for line in verdict.problems:
        print(f"recaption verify: FAIL: {line}")
    checked = "each input key once" if args.input else "files, schemas, counts, no key twice"
    status = "OK" if verdict.ok else f"{len(verdict.problems)} problems"
    print(
        f"recaption verify: {status}: {verdict.shards} shards, {verdict.captioned} captioned, "
        f"{verdict.rejected} rejected ({checked})"
    )
    return 0 if verdict.ok else 1


def cmd_schemas(args: argparse.Namespace) -> int:
    from recaption.records import write_json_schemas

    for path in write_json_schemas(Path(args.dir)):
        print(f"recaption: wrote {path}")
    return 0


def cmd_lens_train(args: argparse.Namespace) -> int:
    from recaption.lens.config import load_lens_config

    overrides = list(args.set)
    for key in ("steps", "device", "batch_size"):
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

    from recaption.lens.eval import detector_accuracy, evaluate_run, table
    from recaption.lens.prompts import geneval_prompts, read_prompts
    from recaption.lens.run import RunDir

    try:
        prompts = read_prompts(Path(args.prompts)) if args.prompts else geneval_prompts()
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read --prompts {args.prompts}: {exc}") from None
    if args.n < 1 or args.steps < 1:
        raise ConfigError("--n and --steps must be at least 1")
    styles = tuple(args.styles.split(","))
    if bad := [s for s in styles if s not in ("short", "dense")]:
        raise ConfigError(f"unknown prompt style {bad[0]!r}: short or dense")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recaption", description="Recaption web image shards into a dense-caption corpus."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="caption input shards into a Parquet corpus")
    p.add_argument(
        "--pipeline", required=True, help="pipeline YAML file, e.g. pipelines/default.yaml"
    )
    p.add_argument("--input", help="input shards folder (same as --set input.path=...)")
    p.add_argument("--output", help="output corpus folder (same as --set output.path=...)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. ray.workers=4",
    )
    p.add_argument("--shards", help='only these shard positions, e.g. "0-9" (input.shards)')
    p.add_argument("--limit", type=int, help="only the first N samples (input.limit)")
    p.add_argument("--fraction", type=float, help="only this share of keys (input.fraction)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("samples", help="write bundled sample web shards (img2dataset layout)")
    p.add_argument("dir")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--photo-share", type=float, default=0.5, help="photographs; the rest are shape scenes"
    )
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser(
        "scenes", help="write procedural shape scenes with ground truth as web shards"
    )
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=20000, help="scenes")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_scenes)

    evals = sub.add_parser("eval", help="measure caption fidelity").add_subparsers(
        dest="eval_command", required=True
    )
    p = evals.add_parser(
        "captions", help="precision and recall of what captions and alt text state, per attribute"
    )
    p.add_argument("--corpus", required=True, help="a corpus made from `recaption scenes` shards")
    p.add_argument("--truth", required=True, help="the scenes folder (its truth.jsonl)")
    p.add_argument("--json", help="write the result to this file")
    p.set_defaults(func=cmd_eval_captions)

    p = sub.add_parser(
        "report",
        help="write CORPUS/report/: index.html (statistics, plots, contact sheet), report.json",
    )
    p.add_argument("corpus")
    p.add_argument(
        "--sample", "--limit", type=int, default=200, help="contact-sheet rows, drawn at random"
    )
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("download", help="URL list -> web shards, with img2dataset")
    p.add_argument("urls", help=".txt (a URL a line), or .parquet/.csv/.tsv/.jsonl/.json table")
    p.add_argument("dir", help="output folder for NNNNN.tar + NNNNN.parquet shards")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption", help="the alt-text column of a table")
    p.add_argument("--image-size", type=int, help="resize the longest side to this (default: no)")
    p.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--threads", type=int, default=32, help="download threads per process")
    p.add_argument("--per-shard", type=int, default=10_000, help="URLs per shard")
    p.add_argument("--timeout", type=int, default=10, help="seconds per URL")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--distributor", default="multiprocessing", choices=["multiprocessing", "ray"])
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "estimate", help="tokens, cost (online and batch) and time of a run, from a sample"
    )
    p.add_argument("--pipeline", required=True, help="pipeline YAML file")
    p.add_argument("--input", help="input shards (overrides input.path)")
    p.add_argument("--sample", type=int, default=200, help="images captioned to measure")
    p.add_argument("--dry", action="store_true", help="no requests: count tokens only")
    p.add_argument("--images", type=int, help="project to this many images (default: the input's)")
    p.add_argument(
        "--output-tokens", type=int, default=250, help="--dry: output tokens assumed per image"
    )
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser(
        "batches", help="openai-batch: the corpus's batches, their status and cost so far"
    )
    p.add_argument("corpus")
    p.add_argument("--cancel", action="store_true", help="cancel the live batches")
    p.set_defaults(func=cmd_batches)

    p = sub.add_parser(
        "verify", help="check the corpus invariant: each input key once, in data/ or rejected/"
    )
    p.add_argument("corpus")
    p.add_argument("--input", help="the input shards, to check every input key is accounted for")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "webdataset", "files", "parquet", "folder"],
        help="the input's format (default: as the run that made the corpus read it)",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("schemas", help="write the JSON Schema files of the records to DIR")
    p.add_argument("dir", nargs="?", default="schemas")
    p.set_defaults(func=cmd_schemas)

    lens = sub.add_parser("lens", help="the bundled minimal Lens trainer").add_subparsers(
        dest="lens_command", required=True
    )
    p = lens.add_parser("train", help="train a small MMDiT on a corpus (resumes a killed run)")
    p.add_argument("--corpus", required=True, help="corpus folder or URI (s3://...)")
    p.add_argument("--config", default="tiny", help="preset: tiny (CPU) or small (one GPU)")
    p.add_argument("--out", help="run folder (default runs/lens-CONFIG)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--max-minutes", type=float, help="stop after this long, with a checkpoint to resume"
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
    p.add_argument("--styles", default="short,dense", help="prompt styles: short, dense")
    p.add_argument("--json", help="write the result to this file")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, help="text feature cache (~/.cache/recaption/text)")
    p.set_defaults(func=cmd_lens_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"recaption: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recaption: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
