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
import gc
import math
import os
import platform
import resource
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from recaption.budget import run_budget, spent_line
from recaption.captioners import ShardPending, backend_of, captioner_identity, make_captioner
from recaption.captioners.batch_queue import QueueActor
from recaption.config import PipelineConfig, RayConfig, redacted
from recaption.corpus import Committed, CorpusStore, warm_writer
from recaption.dedup import SharedIndex
from recaption.dedup.corpus import run_index
from recaption.errors import BudgetSpent, CaptionerFatal, ConfigError, RunError
from recaption.limits import LimiterActor
from recaption.progress import Finished, ProgressStyle, RunSummary, progress_bar
from recaption.progress import show_progress as show_progress_line
from recaption.reading import image_pool
from recaption.records import Manifest, Reason, ShardReport, Usage
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

    def __init__(
        self,
        cfg: PipelineConfig,
        limiters: dict[str, Any],
        env: dict[str, str],
        budget: Any,
        queues: dict[str, Any],
        index: SharedIndex | None = None,
    ) -> None:
        for name, value in env.items():  # credentials, held in memory only
            os.environ.setdefault(name, value)
        self.cfg = cfg
        # loaded once, reused for every shard
        self.captioner = make_captioner(cfg, limiters, budget, queues)
        self.in_flight: asyncio.Semaphore | None = None  # made on the actor's event loop
        self.pool = image_pool(cfg)  # prepares the images of all its shards
        self.index = index  # the run's duplicate index
        self.done: Counter[str] = Counter()
        warm_writer()
        # what start-up made lives as long as the worker: out of the collector's sight, so
        # that collections while captioning walk only what captioning allocates
        gc.freeze()
        self.cpu_started = _cpu_s()

    def _tick(self, usage: Usage, rejected: bool) -> None:
        self.done.update(
            samples=1,
            rejected=int(rejected),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
        self.done["cost_usd"] += usage.cost_usd

    async def process(self, shard: Shard, retry: frozenset[str] | None = None) -> ShardReport:
        """`retry`: the shard is committed; recommit it, asking its rejections with these
        reasons again."""
        if self.in_flight is None:
            self.in_flight = asyncio.Semaphore(self.cfg.limits.concurrency)
        shard_pass = ShardPass(
            shard, self.cfg, self.captioner, self._tick, self.in_flight, retry, self.pool,
            self.index,
        )  # fmt: skip
        return await shard_pass.run()

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
        # "local": a Ray of its own; bare ray.init() joins what /tmp/ray/ray_current_cluster
        # names (a `ray start` head, even a dead one) and then refuses num_cpus
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
        ray.init(address="local", num_cpus=cpus, **quiet)
    try:
        yield
    finally:
        ray.shutdown()


# --- the run ----------------------------------------------------------------------------------

MANIFEST_EVERY_S = 5.0  # the manifest (a summary) is rewritten at most this often, and at the end
MAX_WORKER_STARTS = 3  # a worker slot whose actor dies this often while starting stops the run
# rejections that time heals, asked again by `--retry-rejected` without naming reasons
TRANSIENT = frozenset({"rate_limited", "server_error", "batch_failed", "caption_error"})


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


def _guard_config_drift(cfg: PipelineConfig, committed: Committed) -> None:
    """Refuse to mix captions of another model or prompt into a corpus, unless asked to."""
    new = captioner_identity(cfg)
    old = {who: shard for who, shard in committed.captioners.items() if who != new}
    if old and not cfg.output.allow_config_change:
        (backend, model, prompt), shard = next(iter(old.items()))
        raise RunError(
            f"{cfg.output.path} holds captions by {backend}/{model} with prompt {prompt} "
            f"(shard {shard}, ...); this run would add {'/'.join(new[:2])} with prompt {new[2]}. "
            "Use a new output folder, or --set output.allow_config_change=true to mix them "
            "(every row and shard records its model and prompt_version)"
        )


SELECTION = ("shards", "limit", "fraction")  # input keys that pick part of the input


def _guard_selection(cfg: PipelineConfig, manifest: Manifest, committed: Committed) -> None:
    """A trial run's shards hold only the samples it selected: a run with another selection
    would take them as done."""
    now = {key: getattr(cfg.input, key) for key in SELECTION}
    before = {key: manifest.config.get("input", {}).get(key) for key in SELECTION}
    if committed.ids and now != before:
        shown = ", ".join(f"{k}={v}" for k, v in before.items() if v is not None) or "none"
        raise RunError(
            f"{cfg.output.path} was made with another input selection ({shown}); "
            "write this run to a new output folder"
        )


def _error_line(exc: BaseException) -> str:
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _start_error(exc: RayActorError) -> str:
    """The error a worker's constructor raised, from Ray's report of the dead actor."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [
        line
        for line in lines
        if ": " in line and line.split(":")[0].endswith(("Error", "Exception", "Fatal"))
    ]
    return raised[-1] if raised else (lines[-1] if lines else type(exc).__name__)


def retry_reasons(names: str | None) -> frozenset[str]:
    """`--retry-rejected [REASON,...]`: the named reasons, or the transient ones."""
    if not names:
        return TRANSIENT
    wanted = frozenset(n.strip() for n in names.split(",") if n.strip())
    if bad := sorted(wanted - {r.value for r in Reason}):
        raise ConfigError(f"--retry-rejected: unknown reason {bad[0]!r}")
    return wanted


def run(
    cfg: PipelineConfig,
    show_progress: bool | str | ProgressStyle = True,
    retry_rejected: frozenset[str] | None = None,
) -> RunSummary:
    """Caption the input into the corpus. `show_progress`: True (the bar), False, "auto" (the
    bar on a terminal, a line every 30 s in a log), "bar", "lines", or a ProgressStyle.
    `retry_rejected`: also ask again, in committed shards, the rejected keys with these
    reasons (each shard recommitted whole)."""
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
        return _run(cfg, shards, store, show_progress, retry_rejected)


def _open(
    cfg: PipelineConfig, store: CorpusStore, retry: frozenset[str] | None
) -> tuple[Manifest, Committed, dict[str, frozenset[str]]]:
    """The corpus as this run finds it (one pass over its commit records), guarded, and the
    committed shards to recommit: shard id -> the reasons to ask again."""
    now, versions = datetime.now(UTC), _versions()
    manifest = store.load_manifest() or Manifest(
        recaption_version=versions.get("recaption", "0"), created_at=now, updated_at=now, config={}
    )

    def wanted(report: ShardReport) -> bool:
        return retry is not None and any(report.rejected_by_reason.get(r) for r in retry)

    committed = Committed.read(store, manifest, pick=wanted)
    _guard_config_drift(cfg, committed)
    _guard_selection(cfg, manifest, committed)
    manifest.config = redacted(cfg)
    manifest.versions = versions
    if manifest.shards:  # written before commit records: move them to records
        store.migrate(manifest)
        store.write_manifest(manifest, committed.totals)
    redo = {sid: retry for sid in committed.picked if retry is not None}
    for sid, reasons in store.retries().items():  # a recommit a kill interrupted: finish it
        redo.setdefault(sid, reasons)
    for sid in store.resumable():  # left by a run stopped between a commit and its cleanup
        if sid in committed.ids and sid not in redo:
            store.forget(sid)
    return manifest, committed, redo


def _run(
    cfg: PipelineConfig,
    shards: list[Shard],
    store: CorpusStore,
    show_progress: bool | str | ProgressStyle,
    retry: frozenset[str] | None,
) -> RunSummary:
    started = time.perf_counter()
    manifest, committed, redo = _open(cfg, store, retry)
    todo: deque[tuple[Shard, frozenset[str] | None]] = deque(
        (s, redo.get(s.id)) for s in shards if s.id not in committed.ids or s.id in redo
    )
    summary = RunSummary(
        corpus=store.path,
        shards=len(shards),
        skipped=len(shards) - len(todo),
        finished=Finished(store),
    )
    if not todo:
        _clean_up(cfg, store)  # what a run stopped after its last commit left
        summary.seconds = time.perf_counter() - started
        return summary

    backend = backend_of(cfg)
    asyncio.run(backend.preflight(cfg))  # reachability, before any worker starts
    with ray_runtime(cfg.ray):
        if cfg.ray.gpus_per_worker:  # an actor asking for a GPU no node has would never start
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < cfg.ray.gpus_per_worker:
                raise RunError(
                    f"ray.gpus_per_worker={cfg.ray.gpus_per_worker:g} but the Ray cluster has "
                    f"{gpus:g} GPUs; set it to 0 to run on CPUs"
                )
        run_id = uuid.uuid4().hex[:8]
        index = run_index(cfg, store, committed, run_id)
        # one limiter per endpoint, shared by every worker of this run
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        limiters = {  # on the driver's node, which lives as long as the run
            name: LimiterActor.options(
                name=f"recaption-limiter-{run_id}-{name}", scheduling_strategy=here
            ).remote(**vars(limits))
            for name, limits in backend.metered_endpoints(cfg).items()
        }
        budget = run_budget(cfg, store, committed)
        queues = {  # the Batch API's enqueued-token quota, one per endpoint, for all workers
            name: QueueActor.options(scheduling_strategy=here).remote(limit)
            for name, limit in backend.queues(cfg).items()
        }
        env = backend.worker_env(cfg) | storage_env()  # API keys and object-store credentials
        n_workers = min(cfg.ray.workers, len(todo))
        per_worker = backend.shards_per_worker(cfg)  # the next starts while the last drains

        def new_worker():
            return ShardWorker.options(
                num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker
            ).remote(cfg, limiters, env, budget, queues, index)

        workers = [new_worker() for _ in range(n_workers)]
        # Work goes to a worker once it is up: one that cannot be placed (a full cluster, a
        # replacement for a dead node) holds no shard hostage; the others take them all.
        starting = {w.__ray_ready__.remote(): slot for slot, w in enumerate(workers)}
        up: set[int] = set()
        running: dict[ray.ObjectRef, tuple[int, Any, Shard, frozenset[str] | None]] = {}
        tries: Counter[str] = Counter()  # worker deaths per shard
        start_failures: Counter[int] = Counter()  # per worker slot, in a row
        written = time.monotonic()  # when the manifest was last written

        def submit(slot: int) -> None:
            if todo and slot in up and not summary.spent:
                shard, reasons = todo.popleft()
                ref = workers[slot].process.remote(shard, reasons)
                running[ref] = (slot, workers[slot], shard, reasons)

        def replace(slot: int) -> None:
            up.discard(slot)
            workers[slot] = new_worker()
            starting[workers[slot].__ray_ready__.remote()] = slot

        # `recaption status` reads the total and the start from the manifest, from the start
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        manifest.config["run"] = {"input_shards": len(shards), "started_at": started_at}
        store.write_manifest(manifest, committed.totals)
        bar = progress_bar([s for s, _ in todo], show_progress)
        fatal = None
        try:
            while (running or (todo and starting and not summary.spent)) and not fatal:
                ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=0.5)
                for ref in ready:
                    if ref in starting:
                        slot = starting.pop(ref)
                        try:
                            ray.get(ref)
                        except RayActorError as exc:  # died while starting
                            start_failures[slot] += 1
                            if start_failures[slot] >= MAX_WORKER_STARTS:
                                fatal = f"a worker could not start: {_start_error(exc)}"
                                break
                            replace(slot)
                            continue
                        start_failures[slot] = 0
                        up.add(slot)
                        for _ in range(per_worker):
                            submit(slot)
                        continue
                    slot, worker, shard, reasons = running.pop(ref)
                    try:
                        report: ShardReport = ray.get(ref)
                    except RayActorError as exc:  # the worker died: replace it, retry the shard
                        if workers[slot] is worker:
                            replace(slot)
                        tries[shard.id] += 1
                        if tries[shard.id] < MAX_SHARD_TRIES:
                            todo.appendleft((shard, reasons))  # resumes from its journal
                        else:
                            summary.failed[shard.id] = _error_line(exc)
                        for other in up:  # whoever has room takes it now
                            if sum(r[0] == other for r in running.values()) < per_worker:
                                submit(other)
                        continue
                    except RayTaskError as exc:
                        if isinstance(exc.cause, ShardPending):
                            summary.pending[shard.id] = str(exc.cause)
                        elif isinstance(exc.cause, BudgetSpent):
                            summary.spent = "stopped"  # resumable: admit no more shards
                        else:
                            if isinstance(exc.cause, CaptionerFatal):
                                fatal = str(exc.cause)
                            summary.failed[shard.id] = _error_line(exc)
                    else:
                        before = store.read_commit(shard.id) if reasons is not None else None
                        store.commit(report)  # the shard is committed from here on
                        store.forget(shard.id)
                        committed.add(report, replaces=before)
                        summary.totals.add(report)
                        summary.finished.append(shard.id)
                        if time.monotonic() - written >= MANIFEST_EVERY_S:
                            store.write_manifest(manifest, committed.totals)
                            written = time.monotonic()
                    submit(slot)
                if show_progress:
                    live = [workers[slot] for slot in sorted(up)]
                    show_progress_line(bar, live, summary, time.perf_counter() - started)
        finally:
            bar.close()
            if summary.finished:
                store.write_manifest(manifest, committed.totals)
            with contextlib.suppress(Exception):
                live = [workers[slot] for slot in sorted(up)]
                summary.workers = ray.get([w.progress.remote() for w in live], timeout=5)
            if budget is not None and summary.spent:
                state = ray.get(budget.state.remote())
                summary.spent = spent_line(state, len(todo) + len(summary.pending))
            shared = [*limiters.values(), *queues.values(), *([budget] if budget else [])]
            for actor in [*workers, *shared]:
                ray.kill(actor)  # stops shards still running
            if index is not None:
                index.shutdown()
            _clean_up(cfg, store)
        if fatal:
            raise RunError(fatal)
    summary.seconds = time.perf_counter() - started
    return summary


def _clean_up(cfg: PipelineConfig, store: CorpusStore) -> None:
    """What committed shards left with the service (the Batch API's files): best effort,
    the next run tries again."""
    if done := store.finished_batches():
        try:
            asyncio.run(backend_of(cfg).cleanup(cfg, done))
        except Exception as exc:  # never a reason to fail a run that committed its shards
            print(f"recaption: warning: batch files left to delete: {exc}", file=sys.stderr)
        store.finished_batches()  # the folder, once empty
