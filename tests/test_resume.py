"""Exactly once: kill -9 the run, kill a worker, crash before the manifest, fail a write;
the re-run completes the corpus with no key lost or doubled and no answered call repeated."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kill_run import kill_after, run_argv, run_here
from openai_server import OpenAIServer, repeated_successes
from test_pipeline import assert_invariant

from recaption.captioners import make_captioner
from recaption.config import load_config
from recaption.corpus import corpus_lock, journal_path
from recaption.journal import Journal
from recaption.pipeline import RunError, run
from recaption.records import Reason, Rejection, Stage
from recaption.shard import process_shard
from recaption.sources import list_shards
from recaption.verify import verify

KEY = "fake-test-resume-secret-0123456789"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def expected_keys(shards: Path) -> dict[str, set[str]]:
    return {
        p.stem: set(pq.read_table(p).column("key").to_pylist())
        for p in sorted(shards.glob("*.parquet"))
    }


def overrides(server: OpenAIServer, shards: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        f"input.path={shards}",
        f"output.path={corpus}",
        f"captioner.base_url={server.url}",
        "limits.concurrency=4",
        *extra,
    ]


def assert_complete(corpus: Path, shards: Path) -> None:
    assert_invariant(corpus, expected_keys(shards))
    verdict = verify(corpus, str(shards))
    assert verdict.ok, verdict.problems
    assert not list((corpus / ".journal").glob("*.jsonl"))  # removed once committed
    for path in corpus.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_kill_9_the_run_at_random_moments_then_resume(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    rng = random.Random(4)
    kills = 0
    with OpenAIServer(latency_ms=150, api_key=KEY) as server:
        argv = run_argv("pipelines/openai.yaml", overrides(server, shards, corpus, "ray.workers=2"))
        for _ in range(2):  # at a random moment once captioning is under way; the second
            kills += kill_after(argv, server, rng.randint(5, 40))  # kills a resumed run
        final = run_here(argv)
        events = list(server.events)
    assert final == 0
    assert kills == 2
    assert_complete(corpus, shards)
    # at most what was in flight at each kill: workers x limits.concurrency
    assert repeated_successes(events) <= kills * 2 * 4
    records = [json.loads(p.read_text()) for p in (corpus / "commits").glob("*.json")]
    assert sum(r["resumed"] for r in records) > 0


def test_a_killed_worker_is_replaced_and_its_shard_resumed(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    with OpenAIServer(latency_ms=150, api_key=KEY) as server:
        cfg = load_config(
            "pipelines/openai.yaml", overrides(server, shards, corpus, "ray.workers=2")
        )

        def answering() -> psutil.Process | None:
            """A worker whose open journal has answers (on a loaded machine one worker can
            answer the first 30 alone while the other's journals are still empty)."""
            for p in psutil.Process().children(recursive=True):  # this session's Ray only
                with contextlib.suppress(psutil.Error, OSError):  # it or a journal just went
                    if "ray::ShardWorker" not in " ".join(p.cmdline()):
                        continue
                    journals = [f.path for f in p.open_files() if f.path.endswith(".jsonl")]
                    if any(os.path.getsize(j) for j in journals):
                        return p
            return None

        def kill_a_worker() -> None:
            while not finished.is_set():
                if len(server.events) >= 30 and (victim := answering()) is not None:
                    os.kill(victim.pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        finished = threading.Event()
        killer = threading.Thread(target=kill_a_worker)
        killer.start()
        summary = run(cfg, show_progress=False)
        finished.set()
        killer.join()
        events = list(server.events)
    assert not summary.failed and len(summary.finished) == 3
    assert_complete(corpus, shards)
    assert sum(r.resumed for r in summary.finished) > 0
    assert repeated_successes(events) <= 4


def test_a_crash_between_commit_and_manifest_repeats_no_call(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        cfg = load_config("pipelines/openai.yaml", overrides(server, shards, corpus))
        # the worker committed shard 00000's files, and the driver died before the manifest
        first = process_shard(list_shards(str(shards))[0], cfg, make_captioner(cfg))
        assert journal_path(corpus, "00000").exists() and not (corpus / "manifest.json").exists()
        asked = len(server.events)
        summary = run(cfg, show_progress=False)
        events = list(server.events)
    redone = next(r for r in summary.finished if r.shard == "00000")
    assert redone.resumed == first.captioned and redone.captioned == first.captioned
    assert repeated_successes(events) == 0
    assert len(events) - asked == sum(r.requests for r in summary.finished)
    assert_complete(corpus, shards)


def test_a_failed_write_keeps_the_journal_and_the_rerun_completes(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    obstacle = corpus / "rejected" / "00001.parquet"
    obstacle.mkdir(parents=True)  # the final name is taken: the commit's rename fails
    with OpenAIServer(api_key=KEY) as server:
        cfg = load_config("pipelines/openai.yaml", overrides(server, shards, corpus))
        summary = run(cfg, show_progress=False)
        assert list(summary.failed) == ["00001"]
        assert "Is a directory" in summary.failed["00001"]
        answered = Journal(corpus, "00001").answered
        assert len(answered) > 30  # every caption is kept for the re-run
        obstacle.rmdir()
        asked = len(server.events)
        again = run(cfg, show_progress=False)
        events = list(server.events)
    assert [r.shard for r in again.finished] == ["00001"] and again.skipped == 2
    assert again.finished[0].resumed == len(answered)
    assert len(events) == asked  # nothing asked again
    assert_complete(corpus, shards)


def refused(key: str) -> Rejection:
    return Rejection(
        key=key, shard="00000", url=None, stage=Stage.caption, reason=Reason.refusal, detail="no"
    )


def test_a_torn_journal_record_is_cut_and_asked_again(tmp_path):
    journal = Journal(tmp_path, "00000")
    journal.record("rejected", refused("a"), {})
    journal.record("rejected", refused("b"), {})
    journal.close()
    path = journal_path(tmp_path, "00000")
    path.write_bytes(path.read_bytes()[:-7])  # killed in the middle of writing "b"
    reopened = Journal(tmp_path, "00000")
    assert set(reopened.answered) == {"a"}
    reopened.record("rejected", refused("c"), {})
    reopened.close()
    assert set(Journal(tmp_path, "00000").answered) == {"a", "c"}


def test_a_different_model_is_refused_unless_asked_for(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    base = [f"input.path={shards}", f"output.path={corpus}", "captioner.ocr=never"]
    only_first = tmp_path / "first"
    only_first.mkdir()
    for name in ("00000.tar", "00000.parquet"):
        (only_first / name).symlink_to(shards / name)
    run(load_config("pipelines/default.yaml", [*base, f"input.path={only_first}"]), False)
    with OpenAIServer(api_key=KEY) as server:
        cfg = load_config("pipelines/openai.yaml", overrides(server, shards, corpus))
        with pytest.raises(RunError, match="allow_config_change"):
            run(cfg, show_progress=False)
        cfg = load_config(
            "pipelines/openai.yaml",
            overrides(server, shards, corpus, "output.allow_config_change=true"),
        )
        run(cfg, show_progress=False)
    records = [json.loads(p.read_text()) for p in (corpus / "commits").glob("*.json")]
    assert {r["backend"] for r in records} == {"analyzer", "openai"}
    assert_complete(corpus, shards)


def test_verify_reports_a_lost_and_a_doubled_key(ray_cluster, sample_shards, tmp_path):
    corpus = tmp_path / "corpus"
    base = [f"input.path={sample_shards}", f"output.path={corpus}", "captioner.ocr=never"]
    run(load_config("pipelines/default.yaml", base), show_progress=False)

    def verify_cli() -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "recaption.cli", "verify", str(corpus)]
        return subprocess.run(
            [*argv, "--input", str(sample_shards)], capture_output=True, text=True
        )

    ok = verify_cli()
    assert ok.returncode == 0 and "OK: 2 shards" in ok.stdout, ok.stdout
    path = corpus / "data" / "00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(1), path)  # a row lost
    lost = verify_cli()
    assert lost.returncode == 1
    assert "1 input keys in neither data/ nor rejected/" in lost.stdout
    assert "the manifest says" in lost.stdout
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), path)  # a row doubled
    doubled = verify_cli()
    assert doubled.returncode == 1 and "1 keys appear twice" in doubled.stdout


def test_one_run_at_a_time_per_corpus(sample_shards, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cfg = load_config(
        "pipelines/default.yaml", [f"input.path={sample_shards}", f"output.path={corpus}"]
    )
    held = f"in use by another recaption run \\(pid {os.getpid()}"
    with corpus_lock(corpus), pytest.raises(RunError, match=held):  # as if another run held it
        run(cfg, show_progress=False)
    assert not (corpus / "manifest.json").exists()
