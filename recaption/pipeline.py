"""The job: input shards in, corpus shards out, on Ray. The driver, its workers, its guards.

run() ── checks (config, credentials) ── input_shards ── lock the corpus
      ── skip committed shards ── guards (model/prompt drift, selection) ── preflight
      ── LimiterActor per metered endpoint ── ShardWorker actors (the backend says how many
         shards each keeps queued; a dead worker's shards go back in line)
ShardWorker.process(shard) = ShardPass(shard).run()   (recaption/shard.py: the per-sample path)
the driver records each committed shard in manifest.json, then drops its resume state.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import resource
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from recaption.captioners import ShardPending, backend_of, captioner_identity, make_captioner
from recaption.config import PipelineConfig, RayConfig, redacted
from recaption.corpus import CorpusStore
from recaption.errors import CaptionerFatal, RunError
from recaption.limits import LimiterActor
from recaption.records import Manifest, ShardReport, Usage
from recaption.shard import ShardPass
from recaption.sources import Shard, input_shards
from recaption.storage import storage_env

MAX_SHARD_TRIES = 3  # a shard whose worker dies this often is reported failed


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


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

    def _tick(self, usage: Usage, rejected: bool) -> None:
        self.done.update(
            samples=1,
            rejected=int(rejected),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
        self.done["cost_usd"] += usage.cost_usd

    async def process(self, shard: Shard) -> ShardReport:
        if self.in_flight is None:
            self.in_flight = asyncio.Semaphore(self.cfg.limits.concurrency)
        return await ShardPass(shard, self.cfg, self.captioner, self._tick, self.in_flight).run()

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


def _error_line(exc: BaseException) -> str:
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def run(cfg: PipelineConfig, show_progress: bool = True) -> RunSummary:
    # a captioner config that cannot work (a prompt, a model path, credentials) fails
    # before anything is written
    captioner_identity(cfg)
    backend_of(cfg).check(cfg)
    shards = input_shards(cfg.input)
    store = CorpusStore(cfg.output.path, cfg.output.staging)
    try:
        store.local.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot use output {cfg.output.path}: {exc.strerror or exc}") from None
    with store.lock():
        return _run(cfg, shards, store, show_progress)


def _run(
    cfg: PipelineConfig, shards: list[Shard], store: CorpusStore, show_progress: bool
) -> RunSummary:
    started = time.perf_counter()
    now, versions = datetime.now(UTC), _versions()
    manifest = store.load_manifest() or Manifest(
        recaption_version=versions.get("recaption", "0"),
        created_at=now,
        updated_at=now,
        config={},
    )
    _guard_config_drift(cfg, manifest)
    _guard_selection(cfg, manifest)
    manifest.config = redacted(cfg)
    manifest.versions = versions
    done = store.committed(manifest)
    for sid in done:  # left behind by a run stopped between the manifest and the cleanup
        store.forget(sid)
    todo = deque(s for s in shards if s.id not in done)
    summary = RunSummary(corpus=store.path, shards=len(shards), skipped=len(shards) - len(todo))
    if not todo:
        summary.seconds = time.perf_counter() - started
        return summary

    backend = backend_of(cfg)
    asyncio.run(backend.preflight(cfg))  # reachability, before any worker starts
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
            for name, (rpm, tpm) in backend.metered_endpoints(cfg).items()
        }
        env = backend.worker_env(cfg) | storage_env()  # API keys and object-store credentials
        n_workers = min(cfg.ray.workers, len(todo))
        per_worker = backend.shards_per_worker(cfg)  # the next starts while the last drains

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
                        store.write_manifest(manifest)
                        store.forget(shard.id)  # only now: the shard is on record
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
            postfix["$"] = f"{done['cost_usd']:.4f}"
        bar.set_postfix(postfix)
