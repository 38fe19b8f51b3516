"""The job: input shards in, corpus shards out, on Ray.

run() ── input_shards ── skip shards in the manifest ── preflight ── LimiterActor per endpoint
      ── ShardWorker actors (two shards queued each, 16 in batch mode; a dead worker's
         shards go back in line)
ShardWorker.process(shard) = process_shard_async():
    [a batch backend first settles the shard's answers through the Batch API]
    read_samples ─▶ prepare ─▶ [journal has it? replay] ─▶ captioner.caption (or its answer)
                 ─▶ validate_caption ─▶ ShardWriter + Journal
                      │ every failure becomes a Rejection row, never a crash
the driver records each committed shard in manifest.json, then drops its resume state.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import platform
import resource
import socket
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from recaption.captioners import (
    Answer,
    Captioner,
    CaptionerFatal,
    CaptionFailure,
    CaptionResult,
    ShardPending,
    captioner_identity,
    make_captioner,
    metered_endpoints,
    preflight,
    worker_env,
)
from recaption.config import PipelineConfig, RayConfig, redacted
from recaption.images import ImageRejected, PreparedImage, prepare
from recaption.journal import Journal, forget_shard
from recaption.limits import LimiterActor
from recaption.records import CaptionRecord, Manifest, Reason, Rejection, ShardReport, Stage
from recaption.sinks import (
    DATA_DIR,
    REJECTED_DIR,
    CorpusStore,
    ShardWriter,
    load_manifest,
    write_manifest,
)
from recaption.sources import Sample, Shard, input_shards, read_samples
from recaption.storage import storage_env
from recaption.validation import CaptionInvalid, validate_caption

_TRUNCATION = {Reason.truncated_member, Reason.missing_from_tar}
# Shards queued on a worker at once: the next one starts while the last one drains.
SHARDS_PER_WORKER = 2
MAX_SHARD_TRIES = 3  # a shard whose worker dies this often is reported failed
LOCK = ".lock"  # in the corpus, held by the run writing to it


class RunError(Exception):
    """The run cannot proceed; the message is one line for the user."""


# --- one shard -------------------------------------------------------------------------------


def process_shard(
    shard: Shard,
    cfg: PipelineConfig,
    captioner: Captioner,
    on_sample: Callable[[Counter[str]], None] = lambda usage: None,
) -> ShardReport:
    """Caption one shard and commit its output; every sample ends in data/ or rejected/.
    `on_sample` gets each sample's usage (tokens, micro-dollars; rejected=1 for a rejection)
    as it is written."""

    async def once() -> ShardReport:
        try:
            return await process_shard_async(shard, cfg, captioner, on_sample)
        finally:
            await captioner.aclose()  # its connections belong to this event loop

    return asyncio.run(once())


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def process_shard_async(
    shard: Shard,
    cfg: PipelineConfig,
    captioner: Captioner,
    on_sample: Callable[[Counter[str]], None] = lambda usage: None,
    in_flight: asyncio.Semaphore | None = None,
) -> ShardReport:
    """`in_flight` bounds the images being captioned; a worker shares one across its shards."""
    started = time.perf_counter()
    store = CorpusStore(cfg.output.path, cfg.output.staging)
    writer = ShardWriter(store, shard.id, cfg.output.row_group_size)
    # what an earlier, unfinished run of this shard already answered
    journal = Journal(store.local, shard.id, enabled=cfg.output.journal)
    resumed = 0
    timings: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    usage: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()  # API requests and what came back

    def account(result: CaptionResult | CaptionFailure) -> Counter[str]:
        spent = Counter(
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            cost_micro_usd=round(result.cost_usd * 1e6),
        )
        usage.update(spent)
        outcomes.update(result.outcomes)
        return spent

    def reject(
        sample: Sample,
        stage: Stage,
        reason: Reason,
        detail: str,
        attempts: int = 0,
        spent: Counter[str] | None = None,
    ) -> None:
        rejection = Rejection(
            key=sample.key,
            shard=shard.id,
            url=sample.url,
            stage=stage,
            reason=reason,
            detail=detail[:500],
            attempts=attempts,
        )
        writer.reject(rejection)
        if stage in (Stage.caption, Stage.validate):  # the captioner was asked: never again
            journal.record("rejected", rejection.model_dump(mode="json"), spent or {})
        rejected[reason] += 1
        on_sample((spent or Counter()) + Counter(rejected=1))

    def replay(sample: Sample, image: PreparedImage, entry: dict) -> None:
        """A key answered before this shard was interrupted: its row, without a new call."""
        spent = Counter(entry["spent"])
        usage.update(spent)
        if entry["kind"] == "data":
            row = entry["row"] | {
                "image": image.data if cfg.output.store_images else None,
                "image_sha256": image.sha256,
                "width": image.width,
                "height": image.height,
            }
            writer.add(CaptionRecord.model_validate(row))
        else:
            writer.reject(Rejection.model_validate(entry["row"]))
            rejected[entry["row"]["reason"]] += 1
            spent["rejected"] = 1
        on_sample(spent)

    async def caption_one(sample: Sample, image: PreparedImage, answer: Answer | None) -> None:
        t0 = time.perf_counter()
        try:
            if isinstance(answer, CaptionFailure):
                raise answer
            if isinstance(answer, CaptionResult):
                result = answer
            else:
                result = await (answer or captioner.caption)(image)
        except CaptionFailure as exc:
            spent = account(exc)
            return reject(sample, Stage.caption, exc.reason, exc.detail, exc.attempts, spent)
        except CaptionerFatal:
            raise  # nothing can be captioned: stop the shard, and the run
        except Exception as exc:  # a backend bug must cost one row, not the shard
            return reject(
                sample, Stage.caption, Reason.caption_error, f"{type(exc).__name__}: {exc}", 1
            )
        finally:
            timings["caption_s"] += time.perf_counter() - t0
        latency_ms = result.latency_ms or (time.perf_counter() - t0) * 1000
        spent = account(result)
        t1 = time.perf_counter()
        try:
            caption = validate_caption(result.caption, cfg.validation)
        except CaptionInvalid as exc:
            return reject(sample, Stage.validate, exc.reason, exc.detail, result.attempts, spent)
        finally:
            timings["validate_s"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        record = CaptionRecord(
            key=sample.key,
            shard=shard.id,
            url=sample.url,
            alt_text=sample.alt_text,
            image=image.data if cfg.output.store_images else None,
            image_sha256=image.sha256,
            width=image.width,
            height=image.height,
            **caption.model_dump(),
            model=captioner.model,
            backend=captioner.backend,
            prompt_version=captioner.prompt_version,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            cost_usd=result.cost_usd,
            attempts=result.attempts,
            latency_ms=round(latency_ms, 3),
            created_at=datetime.now(UTC),
        )
        writer.add(record)
        journal.record("data", record.model_dump(mode="json", exclude={"image"}), spent)
        timings["write_s"] += time.perf_counter() - t2
        on_sample(spent)

    in_flight = in_flight or asyncio.Semaphore(cfg.limits.concurrency)
    tasks: set[asyncio.Task] = set()

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        in_flight.release()

    samples = 0
    try:
        # a batch backend answers the whole shard first; the pass below writes the answers
        settle = getattr(captioner, "settle", None)
        answers = await settle(shard, journal.answered) if settle else {}
        stream = read_samples(shard)
        while True:
            t0 = time.perf_counter()
            sample = next(stream, None)
            timings["read_s"] += time.perf_counter() - t0
            if sample is None:
                break
            samples += 1
            if sample.error:
                reject(sample, Stage.read, *sample.error)
                continue
            t0 = time.perf_counter()
            try:
                image = prepare(sample.image, cfg.captioner.image)
            except ImageRejected as exc:
                reject(sample, Stage.decode, exc.reason, exc.detail)
                continue
            finally:
                sample.image = None  # the raw bytes are not needed past this point
                timings["prepare_s"] += time.perf_counter() - t0
            if sample.key in journal.answered:
                replay(sample, image, journal.answered[sample.key])
                resumed += 1
                continue
            await in_flight.acquire()  # at most `limits.concurrency` images held in flight
            task = asyncio.create_task(caption_one(sample, image, answers.pop(sample.key, None)))
            tasks.add(task)
            task.add_done_callback(finished)
        await asyncio.gather(*tasks)
        t0 = time.perf_counter()
        writer.commit()
        timings["write_s"] += time.perf_counter() - t0
    except BaseException:
        for task in tasks:  # a worker's event loop outlives the shard: leave nothing running
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.abort()
        raise
    finally:
        journal.close()  # kept until the manifest records the shard; the driver removes it

    timings["total_s"] = time.perf_counter() - started
    requests = outcomes.pop("requests", 0)
    return ShardReport(
        shard=shard.id,
        source=str(shard.path),
        samples=samples,
        captioned=writer.data.count,
        rejected=writer.rejected.count,
        rejected_by_reason=dict(sorted(rejected.items())),
        truncated=any(reason in _TRUNCATION for reason in rejected),
        input_tokens=usage["input_tokens"],
        output_tokens=usage["output_tokens"],
        cost_usd=usage["cost_micro_usd"] / 1e6,
        requests=requests,
        request_outcomes=dict(sorted(outcomes.items())),
        resumed=resumed,
        backend=captioner.backend,
        model=captioner.model,
        prompt_version=captioner.prompt_version,
        timings={k: round(v, 4) for k, v in sorted(timings.items())},
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        worker=f"{socket.gethostname()}:{os.getpid()}",
        finished_at=datetime.now(UTC),
    )


# --- Ray workers ------------------------------------------------------------------------------


@ray.remote
class ShardWorker:
    """An async actor: its shards and `progress` share one event loop, so the HTTP
    connection pools and the in-flight budget outlive any one shard, and the next shard
    starts reading while the last requests of the previous one are still out."""

    def __init__(self, cfg: PipelineConfig, limiters: dict[str, Any], env: dict[str, str]) -> None:
        for name, value in env.items():  # credentials, held in memory only
            os.environ.setdefault(name, value)
        self.cfg = cfg
        self.captioner = make_captioner(cfg, limiters)  # loaded once, reused for every shard
        self.in_flight: asyncio.Semaphore | None = None  # made on the actor's event loop
        self.done: Counter[str] = Counter()
        self.cpu_started = _cpu_s()

    def _tick(self, spent: Counter[str]) -> None:
        self.done["samples"] += 1
        self.done.update(spent)

    async def process(self, shard: Shard) -> ShardReport:
        if self.in_flight is None:
            self.in_flight = asyncio.Semaphore(self.cfg.limits.concurrency)
        return await process_shard_async(
            shard, self.cfg, self.captioner, self._tick, self.in_flight
        )

    async def progress(self) -> dict[str, float]:
        """Counts so far; `cpu_s` is the whole worker process's CPU time since it was ready."""
        return {
            **self.done,
            "requests": self.captioner.counters["requests"],
            "cpu_s": _cpu_s() - self.cpu_started,
        }


@contextlib.contextmanager
def ray_runtime(rc: RayConfig) -> Iterator[None]:
    """Join the cluster at `ray.address`, or start a local Ray sized for the workers.
    An already initialised Ray (a test session, a notebook) is used as it is."""
    if ray.is_initialized():
        yield
        return
    address = rc.address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(rc.workers * rc.cpus_per_worker))
        ray.init(
            num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
        )
    try:
        yield
    finally:
        ray.shutdown()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class RunSummary:
    corpus: str
    shards: int
    skipped: int
    finished: list[ShardReport] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # shards waiting on their batches
    seconds: float = 0.0
    workers: list[dict[str, float]] = field(default_factory=list)  # their last progress()

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.finished)

    def lines(self) -> list[str]:
        captioned = sum(r.captioned for r in self.finished)
        reasons: Counter[str] = Counter()
        for r in self.finished:
            reasons.update(r.rejected_by_reason)
        rate = self.samples / self.seconds if self.seconds else 0.0
        out = [
            f"shards: {len(self.finished)} done, {self.skipped} already done, {len(self.failed)} failed "
            f"(of {self.shards})",
            f"samples: {self.samples} -> {captioned} captioned, {sum(reasons.values())} rejected"
            + (f" ({', '.join(f'{k} {v}' for k, v in reasons.most_common())})" if reasons else ""),
            f"speed: {rate:.1f} images/s over {self.seconds:.1f}s",
            f"corpus: {self.corpus}",
        ]
        out += [f"failed shard {sid}: {err}" for sid, err in sorted(self.failed.items())]
        if self.pending:
            out.append(
                f"waiting: {len(self.pending)} shards have batches running "
                f"(e.g. {min(self.pending)}: {self.pending[min(self.pending)]})"
            )
        return out


def _versions() -> dict[str, str]:
    names = (
        "recaption",
        "ray",
        "pyarrow",
        "pillow",
        "pydantic",
        "numpy",
        "opencv-python-headless",
        "openai",
    )
    found = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def _guard_config_drift(cfg: PipelineConfig, manifest: Manifest) -> None:
    """Refuse to mix captions of another model or prompt into a corpus, unless asked to."""
    new = captioner_identity(cfg)
    old = {
        (r.backend, r.model, r.prompt_version): r.shard
        for r in manifest.shards.values()
        if r.backend and (r.backend, r.model, r.prompt_version) != new
    }
    if old and not cfg.output.allow_config_change:
        (backend, model, prompt), shard = next(iter(old.items()))
        raise RunError(
            f"{cfg.output.path} holds captions by {backend}/{model} with prompt {prompt} "
            f"(shard {shard}, ...); this run would add {'/'.join(new[:2])} with prompt {new[2]}. "
            "Use a new output folder, or --set output.allow_config_change=true to mix them "
            "(every row and shard records its model and prompt_version)"
        )


SELECTION = ("shards", "limit", "fraction")  # input keys that pick part of the input


def _guard_selection(cfg: PipelineConfig, manifest: Manifest) -> None:
    """A trial run's shards hold only the samples it selected: a run with another selection
    would take them as done."""
    now = {key: getattr(cfg.input, key) for key in SELECTION}
    before = {key: manifest.config.get("input", {}).get(key) for key in SELECTION}
    if manifest.shards and now != before:
        shown = ", ".join(f"{k}={v}" for k, v in before.items() if v is not None) or "none"
        raise RunError(
            f"{cfg.output.path} was made with another input selection ({shown}); "
            "write this run to a new output folder"
        )


def _committed(store: CorpusStore, manifest: Manifest) -> set[str]:
    return {
        sid
        for sid in manifest.shards
        if store.exists(f"{DATA_DIR}/{sid}.parquet")
        and store.exists(f"{REJECTED_DIR}/{sid}.parquet")
    }


def _error_line(exc: BaseException) -> str:
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


@contextlib.contextmanager
def corpus_lock(corpus: Path) -> Iterator[None]:
    """One run at a time per corpus. The OS drops the lock when the holder dies, even by
    `kill -9`, so a crashed run never leaves a stale lock behind."""
    with open(corpus / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunError(
                f"{corpus} is in use by another recaption run ({holder}); wait for it or stop it"
            ) from None
        fh.truncate(0)
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield


def run(cfg: PipelineConfig, show_progress: bool = True) -> RunSummary:
    captioner_identity(cfg)  # a captioner config that cannot work fails before any write
    shards = input_shards(cfg.input)
    try:
        store = CorpusStore(cfg.output.path, cfg.output.staging)
        store.local.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise RunError(f"cannot use output {cfg.output.path}: {reason}") from None
    # one run at a time per corpus on this machine; an object store has no locks to take
    with corpus_lock(store.local):
        return _run(cfg, shards, store, show_progress)


def _run(
    cfg: PipelineConfig, shards: list[Shard], store: CorpusStore, show_progress: bool
) -> RunSummary:
    started = time.perf_counter()
    now, versions = datetime.now(UTC), _versions()
    manifest = load_manifest(store) or Manifest(
        recaption_version=versions.get("recaption", "0"),
        created_at=now,
        updated_at=now,
        config={},
    )
    _guard_config_drift(cfg, manifest)
    _guard_selection(cfg, manifest)
    manifest.config = redacted(cfg)
    manifest.versions = versions
    done = _committed(store, manifest)
    for sid in done:  # left behind by a run stopped between the manifest and the cleanup
        forget_shard(store.local, sid)
    todo = deque(s for s in shards if s.id not in done)
    summary = RunSummary(corpus=store.path, shards=len(shards), skipped=len(shards) - len(todo))
    if not todo:
        summary.seconds = time.perf_counter() - started
        return summary

    try:  # credentials and reachability, before any worker starts or anything is written
        asyncio.run(preflight(cfg))
    except CaptionerFatal as exc:
        raise RunError(str(exc)) from None
    expected = None
    with contextlib.suppress(Exception):
        expected = sum(s.expected_samples() for s in todo)
    with ray_runtime(cfg.ray):
        if cfg.ray.gpus_per_worker:  # an actor asking for a GPU no node has would never start
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < cfg.ray.gpus_per_worker:
                raise RunError(
                    f"ray.gpus_per_worker={cfg.ray.gpus_per_worker:g} but the Ray cluster has "
                    f"{gpus:g} GPUs; set it to 0 to run on CPUs"
                )
        run_id = uuid.uuid4().hex[:8]
        # one limiter per endpoint, shared by every worker of this run
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        limiters = {  # on the driver's node, which lives as long as the run
            name: LimiterActor.options(
                name=f"recaption-limiter-{run_id}-{name}", scheduling_strategy=here
            ).remote(rpm, tpm)
            for name, (rpm, tpm) in metered_endpoints(cfg).items()
        }
        env = worker_env(cfg) | storage_env()  # API keys and object-store credentials
        n_workers = min(cfg.ray.workers, len(todo))
        # shards queued on a worker at once; a shard in a batch mostly waits, so many more
        batched = cfg.captioner.backend == "openai-batch"
        per_worker = cfg.captioner.batch.shards_per_worker if batched else SHARDS_PER_WORKER

        def new_worker():
            return ShardWorker.options(
                num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker
            ).remote(cfg, limiters, env)

        workers = [new_worker() for _ in range(n_workers)]
        # Work goes to a worker once it is up: one that cannot be placed (a full cluster, a
        # replacement for a dead node) holds no shard hostage; the others take them all.
        starting = {w.__ray_ready__.remote(): slot for slot, w in enumerate(workers)}
        up: set[int] = set()
        running: dict[ray.ObjectRef, tuple[int, Any, Shard]] = {}
        tries: Counter[str] = Counter()  # worker deaths per shard

        def submit(slot: int) -> None:
            if todo and slot in up:
                shard = todo.popleft()
                running[workers[slot].process.remote(shard)] = (slot, workers[slot], shard)

        def replace(slot: int) -> None:
            up.discard(slot)
            workers[slot] = new_worker()
            starting[workers[slot].__ray_ready__.remote()] = slot

        bar = tqdm(
            total=expected,
            unit="img",
            disable=not show_progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        fatal = None
        try:
            while (running or (todo and starting)) and not fatal:
                ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=0.5)
                for ref in ready:
                    if ref in starting:
                        slot = starting.pop(ref)
                        try:
                            ray.get(ref)
                        except RayActorError:  # died while starting
                            replace(slot)
                            continue
                        up.add(slot)
                        for _ in range(per_worker):
                            submit(slot)
                        continue
                    slot, worker, shard = running.pop(ref)
                    try:
                        report: ShardReport = ray.get(ref)
                    except RayActorError as exc:  # the worker died: replace it, retry the shard
                        if workers[slot] is worker:
                            replace(slot)
                        tries[shard.id] += 1
                        if tries[shard.id] < MAX_SHARD_TRIES:
                            todo.appendleft(shard)  # resumes from its journal, on any worker
                        else:
                            summary.failed[shard.id] = _error_line(exc)
                        for other in up:  # whoever has room takes it now
                            if sum(s == other for s, _, _ in running.values()) < per_worker:
                                submit(other)
                        continue
                    except RayTaskError as exc:
                        if isinstance(exc.cause, ShardPending):
                            summary.pending[shard.id] = str(exc.cause)
                        else:
                            if isinstance(exc.cause, CaptionerFatal):
                                fatal = str(exc.cause)
                            summary.failed[shard.id] = _error_line(exc)
                    else:
                        manifest.shards[shard.id] = report
                        write_manifest(store, manifest)
                        forget_shard(store.local, shard.id)  # only now: the shard is on record
                        summary.finished.append(report)
                    submit(slot)
                if show_progress:
                    live = [workers[slot] for slot in sorted(up)]
                    _show_progress(bar, live, summary, time.perf_counter() - started)
        finally:
            bar.close()
            with contextlib.suppress(Exception):
                live = [workers[slot] for slot in sorted(up)]
                summary.workers = ray.get([w.progress.remote() for w in live], timeout=5)
            for actor in [*workers, *limiters.values()]:  # stops shards still running
                ray.kill(actor)
        if fatal:
            raise RunError(fatal)
    summary.seconds = time.perf_counter() - started
    return summary


def _show_progress(bar: tqdm, workers: list, summary: RunSummary, elapsed: float) -> None:
    with contextlib.suppress(Exception):  # progress is best effort, never a failure
        done: Counter[str] = Counter()
        for counts in ray.get([w.progress.remote() for w in workers], timeout=5):
            done.update(counts)
        bar.update(max(0, done["samples"] - bar.n))
        postfix = {
            "shards": f"{len(summary.finished)}/{summary.shards - summary.skipped}",
            "rejected": done["rejected"],
        }
        if done["requests"]:  # a metered API: show what the quota and the bill are doing
            minutes = elapsed / 60
            postfix["req/min"] = f"{done['requests'] / minutes:.0f}"
            postfix["tok/min"] = f"{(done['input_tokens'] + done['output_tokens']) / minutes:.0f}"
            postfix["$"] = f"{done['cost_micro_usd'] / 1e6:.4f}"
        bar.set_postfix(postfix)
