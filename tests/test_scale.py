"""What a week-long run needs: commits that cost the same at any size (a record per shard),
kill -9 across commits, a corpus of the old layout, a spend cap, and rejections that time
heals asked again without redoing the corpus."""

import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from kill_run import kill_when, run_argv, run_here
from openai_server import Faults, OpenAIServer, repeated_successes
from test_object_storage import s3  # noqa: F401 - the S3 test server fixture
from test_pipeline import assert_invariant
from test_resume import KEY, expected_keys, overrides

from recaption.config import load_config
from recaption.corpus import CorpusStore
from recaption.pipeline import run
from recaption.pricing import PRICES
from recaption.samples import write_samples
from recaption.verify import verify


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """Twelve small shards: a commit every few hundred milliseconds."""
    out = tmp_path_factory.mktemp("many")
    write_samples(out, shards=12, per_shard=6, seed=3, photo_share=0.0)
    return out


def default_run(shards: Path, corpus: str, *extra: str) -> list[str]:
    return run_argv(
        "pipelines/default.yaml",
        [f"input.path={shards}", f"output.path={corpus}", "captioner.ocr=never", *extra],
    )


def kill_at_random(argv: list[str], rng: random.Random, committed: Callable[[], int]) -> None:
    """Start the run and SIGKILL it at a random moment after its first commit."""
    start, delay = committed(), rng.uniform(0, 1.5)
    seen: list[float] = []  # when the first new commit showed

    def ready() -> bool:
        if not seen and committed() != start:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay

    kill_when(argv, ready)


def test_kill_9_across_commits_then_the_rerun_completes(ray_cluster, many, tmp_path):
    corpus = tmp_path / "corpus"
    rng = random.Random(7)
    argv = default_run(many, str(corpus), "ray.workers=2")
    for _ in range(2):  # the second kills a resumed run
        kill_at_random(argv, rng, lambda: len(list((corpus / "commits").glob("*.json"))))
    assert run_here(argv) == 0
    verdict = verify(corpus, str(many))
    assert verdict.ok, verdict.problems
    assert_invariant(corpus, expected_keys(many))
    totals = json.loads((corpus / "manifest.json").read_text())["totals"]
    assert totals["shards"] == 12 and totals["samples"] == 72


def test_kill_9_across_commits_to_s3(ray_cluster, s3, many, tmp_path):  # noqa: F811
    uri, _fs = s3
    staging = tmp_path / "staging"
    argv = default_run(many, uri("killed"), f"output.staging={staging}", "ray.workers=2")

    def committed() -> int:
        return len(CorpusStore(uri("killed")).shard_files("commits", ".json"))

    kill_at_random(argv, random.Random(11), committed)  # the local test kills a resumed run too
    assert run_here(argv) == 0
    verdict = verify(uri("killed"), str(many))
    assert verdict.ok, verdict.problems
    assert verdict.shards == 12 and verdict.captioned + verdict.rejected == 72


def test_a_corpus_of_the_old_layout_opens(ray_cluster, sample_shards, tmp_path):
    corpus = tmp_path / "corpus"
    cfg = load_config(
        "pipelines/default.yaml",
        [f"input.path={sample_shards}", f"output.path={corpus}", "captioner.ocr=never"],
    )
    run(cfg, show_progress=False)
    # as an earlier version wrote it: every shard's report inside manifest.json
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["shards"] = {p.stem: json.loads(p.read_text()) for p in (corpus / "commits").iterdir()}
    del manifest["commit_records"]
    shutil.rmtree(corpus / "commits")
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    verdict = verify(corpus, str(sample_shards))
    assert verdict.ok and verdict.shards == 2, verdict.problems
    again = run(cfg, show_progress=False)  # reads both, then moves the reports to records
    assert again.skipped == 2 and not again.finished
    assert sorted(p.stem for p in (corpus / "commits").iterdir()) == ["00000", "00001"]
    moved = json.loads((corpus / "manifest.json").read_text())
    assert moved["shards"] == {} and moved["totals"] == manifest["totals"]
    assert verify(corpus, str(sample_shards)).ok


def test_the_spend_cap_stops_the_run_resumable_then_a_higher_cap_finishes(
    ray_cluster, shards, tmp_path, capsys
):
    corpus = tmp_path / "corpus"
    price = PRICES["gpt-4.1"]
    with OpenAIServer(latency_ms=40, api_key=KEY) as server:
        # one request costs at most its prompt and all of max_output_tokens=600
        most = price.cost(1500, 600)
        cap = 30 * most
        argv = run_argv(
            "pipelines/openai.yaml",
            overrides(server, shards, corpus, "ray.workers=2", f"limits.max_usd={cap}"),
        )
        stopped = run_here(argv)
        asked, out = len(server.events), capsys.readouterr().out
        assert stopped == 3, out
        assert "stopped at the spend cap" in out and "run again" in out
        assert 0 < asked < 120  # it stopped before the input was done
        store = CorpusStore(corpus)
        cost = store.unwritten_cost() + sum(r.cost_usd for r in store.commits(None))
        assert cap - 2 * most <= cost <= cap  # within a request's cost, never past it
        higher = [*argv[: argv.index(f"limits.max_usd={cap}")], "limits.max_usd=100"]
        final = run_here(higher)
        events = list(server.events)
    assert final == 0
    assert repeated_successes(events) == 0  # nothing answered is asked again
    assert len(events) > asked
    verdict = verify(corpus, str(shards))
    assert verdict.ok, verdict.problems
    assert_invariant(corpus, expected_keys(shards))


def test_retry_rejected_turns_transient_rejections_into_captions(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    faults = Faults(server_error=0.3, rate_limit=0.2)
    with OpenAIServer(latency_ms=10, faults=faults, seed=3, api_key=KEY) as server:
        cfg = load_config(
            "pipelines/openai.yaml",
            # dedup off: a retried key that copies another image would take its caption
            overrides(
                server, shards, corpus, "ray.workers=2", "captioner.max_attempts=1",
                "dedup.mode=off",
            ),
        )  # fmt: skip
        first = run(cfg, show_progress=False)
        reasons = Counter()
        for path in (corpus / "rejected").glob("*.parquet"):
            reasons.update(pq.read_table(path, columns=["reason"]).column("reason").to_pylist())
        assert reasons["server_error"] > 0 and len(first.finished) == 3
        server.faults = Faults()  # the outage is over
        before = len(server.events)
        again = run(cfg, show_progress=False, retry_rejected=frozenset({"server_error"}))
        events = list(server.events)
    assert len(again.finished) == 3 and again.skipped == 0
    assert len(events) - before == reasons["server_error"]  # only those keys asked again
    assert repeated_successes(events) == 0
    after = Counter()
    for path in (corpus / "rejected").glob("*.parquet"):
        after.update(pq.read_table(path, columns=["reason"]).column("reason").to_pylist())
    assert after["server_error"] == 0
    assert after["download_failed"] == reasons["download_failed"]
    verdict = verify(corpus, str(shards))
    assert verdict.ok, verdict.problems
    assert_invariant(corpus, expected_keys(shards))
    totals = json.loads((corpus / "manifest.json").read_text())["totals"]
    captioned = sum(pq.read_metadata(p).num_rows for p in (corpus / "data").glob("*.parquet"))
    assert totals["captioned"] == captioned and totals["rejected"] == sum(after.values())
    assert totals["requests"] == len(events) - sum(e.status == 0 for e in events)
