"""`recaption estimate`: what a run will cost and how long it will take, before paying.

    count the input's images (shard metadata: no image is read)
      ─▶ draw a sample spread over the shards ─▶ caption it for real (online, even for
         openai-batch: the request is the same), or with --dry only count its tokens
      ─▶ per image: input and output tokens, attempts, latency, share rejected
      ─▶ project to the whole input: tokens, cost online and at batch price, and the time
         each limit allows (RPM, TPM as the API counts it, requests in flight), the
         slowest of which binds.

With --dry no request is made: image tokens follow the model's rule exactly, text tokens
are approximated (4 characters a token) and the output is assumed (`--output-tokens`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from datasketches import hll_sketch

from recaption.answer import answer
from recaption.captioners import Captioner, backend_of, make_captioner
from recaption.captioners.prompt import USER_TEXT, load_prompt, prompt_with_schema
from recaption.config import PipelineConfig
from recaption.corpus import Committed, CorpusStore
from recaption.errors import InputError, Rejected
from recaption.images import PreparedImage
from recaption.pricing import image_tokens, price_for
from recaption.reading import samples
from recaption.sources import Shard, input_shards, read_samples

_HASH_COLUMNS = ("sha256", "md5", "sha512")  # img2dataset --compute_hash writes one


def count_images(shards: list[Shard], hashes: hll_sketch | None = None) -> tuple[int, int]:
    """(samples, of which downloaded), from the shards' metadata where it tells; a shard
    without it (a bare tar, a sampled selection) is counted by reading it. `hashes` is fed
    the download hashes the metadata carries (img2dataset `--compute_hash`), if any."""
    samples = downloaded = 0
    for shard in shards:
        if shard.format == "folder" and shard.fraction is None:
            n = min(len(shard.members), shard.take or len(shard.members))
            samples, downloaded = samples + n, downloaded + n
        elif shard.table is None or shard.take is not None or shard.fraction is not None:
            for sample in read_samples(shard):
                samples += 1
                downloaded += sample.error is None
        else:
            file = shard.parquet(shard.table)
            samples += file.metadata.num_rows
            names = file.schema_arrow.names
            if "status" in names:
                status = file.read(columns=["status"]).column("status").to_pylist()
                downloaded += sum(s in (None, "success") for s in status)
            else:
                downloaded += file.metadata.num_rows
            column = next((c for c in _HASH_COLUMNS if c in names), None)
            if hashes is not None and column is not None:
                for value in file.read(columns=[column]).column(column).to_pylist():
                    if value:
                        hashes.update(value)
    return samples, downloaded


def _exact_duplicates(cfg: PipelineConfig, hashes: hll_sketch, downloaded: int) -> dict:
    """Exact duplicates among the downloads, from their hashes (a distinct-count sketch,
    ~1% error, a few KB whatever the input); near duplicates are found only by the run."""
    if cfg.dedup.mode == "off" or hashes.is_empty():
        return {"exact": None, "share": None}
    distinct = min(downloaded, round(hashes.get_estimate()))
    return {"exact": downloaded - distinct, "share": round(1 - distinct / downloaded, 4)}


def draw(shards: list[Shard], n: int, cfg: PipelineConfig) -> tuple[list[PreparedImage], int]:
    """Up to `n` prepared images spread evenly over the shards, and how many failed to
    decode on the way."""
    step = max(1, len(shards) // n) if n else 1
    chosen = shards[::step]
    per_shard = math.ceil(n / len(chosen))
    images: list[PreparedImage] = []
    undecodable = 0
    for shard in chosen:
        taken = 0
        for sample, image in samples(shard, cfg.captioner.image):
            if taken >= per_shard or len(images) >= n:
                break
            if sample.error is not None:
                continue
            taken += 1
            if isinstance(image, Rejected):
                undecodable += 1
            else:
                images.append(image)
    return images, undecodable


async def _over_sample(
    captioner: Captioner,
    images: list[PreparedImage],
    concurrency: int,
    each: Callable[[PreparedImage], Awaitable[None]],
) -> float:
    """Run `each` on the sample, `concurrency` at a time (a local VLM batches them);
    the seconds it took."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(image: PreparedImage) -> None:
        async with gate:
            await each(image)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(gated(image) for image in images))
    finally:
        await captioner.aclose()
    return time.perf_counter() - t0


async def _time_sample(
    captioner: Captioner, images: list[PreparedImage], cfg: PipelineConfig
) -> float:
    """Seconds to caption the sample; a rejected image counts as the time it took."""

    async def each(image: PreparedImage) -> None:
        with contextlib.suppress(Rejected):
            await answer(captioner, image, cfg.validation)

    return await _over_sample(captioner, images, cfg.limits.concurrency, each)


async def _caption_sample(cfg: PipelineConfig, images: list[PreparedImage]) -> dict[str, Any]:
    """Caption the sample for real: tokens, attempts, latency, rejections."""
    online = cfg.model_copy(deep=True)
    online.captioner.backend = backend_of(cfg).online()  # the same request, answered now
    captioner = make_captioner(online)
    tally: Counter[str] = Counter()
    latencies: list[float] = []

    async def each(image: PreparedImage) -> None:
        t0 = time.perf_counter()
        try:
            result, _ = await answer(captioner, image, cfg.validation)
        except Rejected as exc:
            tally.update(input=exc.input_tokens, output=exc.output_tokens)
            tally.update(attempts=exc.attempts, rejected=1)
            return
        latencies.append((time.perf_counter() - t0) / max(result.attempts, 1))
        tally.update(
            input=result.input_tokens, output=result.output_tokens, attempts=result.attempts
        )

    await _over_sample(captioner, images, cfg.limits.concurrency, each)
    return {"tally": tally, "latency_s": sum(latencies) / len(latencies) if latencies else None}


def _dry_tally(cfg: PipelineConfig, images: list[PreparedImage], output_tokens: int) -> Counter:
    model = cfg.captioner.model or "gpt-4.1"
    # the schema is paid for either way: in the prompt, or as the structured-output format
    prompt = prompt_with_schema(load_prompt(cfg.captioner.prompt)[1])
    text_tokens = math.ceil(len(prompt + USER_TEXT) / 4) + 7  # + message framing
    tally: Counter[str] = Counter(attempts=len(images))
    for image in images:
        tally["input"] += text_tokens + image_tokens(
            model, image.width, image.height, cfg.captioner.image.detail
        )
        tally["output"] += output_tokens
    return tally


def estimate(
    cfg: PipelineConfig,
    sample: int = 200,
    dry: bool = False,
    images: int | None = None,
    output_tokens: int = 250,
) -> dict[str, Any]:
    """The projection as a dict (`--json` prints it as it is). Shards the output corpus has
    committed already are left out of it."""
    shards = input_shards(cfg.input)
    committed, spent = _committed(cfg)
    todo = [s for s in shards if s.id not in committed]
    hashes = hll_sketch(14)
    samples, downloaded = count_images(todo, hashes)
    duplicates = _exact_duplicates(cfg, hashes, downloaded)
    drawn, undecodable = draw(shards, sample, cfg)
    if not drawn:
        raise InputError(f"no decodable image found in {cfg.input.path}")
    # images that will reach the captioner: downloaded and decodable
    sendable = images if images is not None else downloaded
    if images is None and duplicates["exact"]:  # each picture is captioned once
        sendable -= duplicates["exact"]
    sendable = round(sendable * len(drawn) / (len(drawn) + undecodable))
    out: dict[str, Any] = {
        "input": {
            "shards": len(todo),
            "committed": len(shards) - len(todo),
            "samples": samples,
            "downloaded": downloaded,
        },
        "spent_usd": round(spent, 4),
        "max_usd": cfg.limits.max_usd,
        "images": sendable,
        "duplicates": duplicates,
        "sample": len(drawn),
        "measured": not dry,
        "backend": cfg.captioner.backend,
    }
    if not backend_of(cfg).paid:  # on this machine: time, no cost
        captioner = make_captioner(cfg)
        seconds = asyncio.run(_time_sample(captioner, drawn, cfg))
        out["images_per_s"] = round(len(drawn) / seconds, 3)
        out["minutes"] = round(sendable * seconds / len(drawn) / cfg.ray.workers / 60, 4)
        out["cost_usd"] = {"online": 0.0, "batch": 0.0}
        vlm = captioner.describe()
        if vlm is not None:  # a local VLM: visual tokens drive prefill
            tokens = [captioner.image_tokens(image) for image in drawn[:20]]
            out["image_tokens"] = round(sum(tokens) / len(tokens), 1)
            out["image_max_side"] = cfg.captioner.image.max_side
            out["vlm"] = vlm
        return out

    latency = None
    if dry:
        tally = _dry_tally(cfg, drawn, output_tokens)
    else:
        caught = asyncio.run(_caption_sample(cfg, drawn))
        tally, latency = caught["tally"], caught["latency_s"]
    n = len(drawn)
    per = {
        "input_tokens": tally["input"] / n,
        "output_tokens": tally["output"] / n,
        "attempts": tally["attempts"] / n,
        "rejected_share": tally["rejected"] / n,
    }
    model = cfg.captioner.model or "gpt-4.1"
    price = price_for(model, cfg.captioner.price)
    total_in, total_out = per["input_tokens"] * sendable, per["output_tokens"] * sendable
    if duplicates["exact"]:  # what the images not sent would have cost
        saved = duplicates["exact"] * len(drawn) / (len(drawn) + undecodable)
        duplicates["saved_usd"] = round(
            price.cost(per["input_tokens"] * saved, per["output_tokens"] * saved), 4
        )
    out |= {
        "model": model,
        "per_image": {k: round(v, 3) for k, v in per.items()}
        | {"latency_s": round(latency, 3) if latency else None},
        "tokens": {"input": round(total_in), "output": round(total_out)},
        "cost_usd": {
            "online": round(price.cost(total_in, total_out), 4),
            "batch": round(price.batch().cost(total_in, total_out), 4),
        },
        "limits": _minutes(cfg, sendable, per, latency),
    }
    bound = {k: v for k, v in out["limits"].items() if v is not None}
    out["binding"] = max(bound, key=bound.get) if bound else None
    out["minutes"] = bound[out["binding"]] if bound else None
    quota = cfg.captioner.batch.max_enqueued_tokens
    out["batch"] = {  # the queue holds `quota` input tokens at once; each round ends in 24 h
        "queue_quota": quota,
        "rounds": math.ceil(total_in / quota) if quota else None,
        "hours_at_most": math.ceil(total_in / quota) * 24 if quota else None,
    }
    return out


def _minutes(
    cfg: PipelineConfig, images: int, per: dict[str, float], latency: float | None
) -> dict[str, float | None]:
    """Minutes the whole input takes under each limit on its own (None: not set/measured)."""
    requests = images * per["attempts"]
    # TPM is counted as the API counts it: prompt tokens + the max output asked for
    reserved = images * per["input_tokens"] + requests * cfg.captioner.max_output_tokens
    in_flight = cfg.ray.workers * cfg.limits.concurrency
    return {
        "rpm": round(requests / cfg.limits.rpm, 4) if cfg.limits.rpm else None,
        "tpm": round(reserved / cfg.limits.tpm, 4) if cfg.limits.tpm else None,
        "concurrency": round(requests * latency / in_flight / 60, 4) if latency else None,
    }


def _committed(cfg: PipelineConfig) -> tuple[set[str], float]:
    """The output corpus's committed shards and what they cost (nothing if not written)."""
    store = CorpusStore(cfg.output.path, cfg.output.staging)
    manifest = store.load_manifest()
    if manifest is None:
        return set(), 0.0
    committed = Committed.read(store, manifest)
    return committed.ids, committed.totals.cost_usd


def lines(result: dict[str, Any]) -> list[str]:
    """The estimate for people."""
    src = result["input"]
    done = f" ({src['committed']} more already committed)" if src.get("committed") else ""
    out = [
        f"input: {src['samples']} samples in {src['shards']} shards{done}, "
        f"{src['downloaded']} downloaded -> {result['images']} images to caption",
    ]
    dup = result.get("duplicates") or {}
    if dup.get("exact"):
        saved = f", saving ${dup['saved_usd']:,.2f}" if dup.get("saved_usd") else ""
        out.append(
            f"duplicates: ~{dup['exact']:,} exact copies ({dup['share']:.1%}, from the "
            f"download hashes) are not sent{saved}; near copies are found as the run goes"
        )
    if "per_image" not in result:
        out.append(
            f"{result['backend']} on this machine: {result['images_per_s']} images/s a worker, "
            f"~{_duration(result['minutes'])} for the input, no API cost "
            f"(measured on {result['sample']} images)"
        )
        if "image_tokens" in result:
            vlm = result["vlm"]
            out.append(
                f"{vlm['model']} on {vlm['device']} ({vlm['dtype']}, batch {vlm['batch_size']}): "
                f"{result['image_tokens']:g} image tokens per image at image.max_side "
                f"{result['image_max_side']}; fewer pixels, fewer tokens, faster prefill"
            )
        return out
    per = result["per_image"]
    how = "measured on" if result["measured"] else "counted (--dry) on"
    out += [
        f"per image ({how} {result['sample']}): {per['input_tokens']:.0f} input + "
        f"{per['output_tokens']:.0f} output tokens, {per['attempts']:.2f} attempts"
        + (f", {per['latency_s']:.2f}s latency" if per["latency_s"] else "")
        + (f", {per['rejected_share']:.1%} rejected" if result["measured"] else ""),
        f"tokens: {result['tokens']['input']:,} input, {result['tokens']['output']:,} output "
        f"({result['model']})",
        f"cost: ${result['cost_usd']['online']:,.2f} online, "
        f"${result['cost_usd']['batch']:,.2f} with the Batch API (openai-batch)",
    ]
    limits = result["limits"]
    shown = ", ".join(
        f"{name} {_duration(minutes)}" for name, minutes in limits.items() if minutes is not None
    )
    if result["binding"]:
        out.append(
            f"time online: {_duration(result['minutes'])}, bound by {result['binding']} ({shown})"
        )
    else:
        out.append("time online: set limits.rpm / limits.tpm to your quota to see it")
    batch = result["batch"]
    if batch["queue_quota"]:
        out.append(
            f"time in batches: {result['tokens']['input']:,} input tokens through a queue of "
            f"{batch['queue_quota']:,} (captioner.batch.max_enqueued_tokens) = {batch['rounds']} "
            f"rounds of at most 24 h: {_duration(batch['hours_at_most'] * 60)} at most"
        )
    else:
        out.append(
            "time in batches: set captioner.batch.max_enqueued_tokens to your tier's queue "
            "limit for the model; the job takes (input tokens / that limit) rounds of <= 24 h"
        )
    cap = result.get("max_usd")
    kind = "batch" if result["backend"] == "openai-batch" else "online"
    projected = result["spent_usd"] + result["cost_usd"][kind]
    if cap is not None and projected > cap:
        out.append(
            f"warning: ${projected:,.2f} ({kind}, with ${result['spent_usd']:,.2f} spent) passes "
            f"limits.max_usd=${cap:,.2f}: the run will stop at the cap, resumable"
        )
    return out


def _duration(minutes: float) -> str:
    if minutes < 90:
        return f"{minutes:,.1f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:,.1f} h"
    return f"{minutes / 1440:,.1f} days"
