"""The command as users run it: a subprocess, exit codes, one-line errors."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recaption.config import load_config
from recaption.errors import ConfigError

RECAPTION = str(Path(sys.executable).parent / "recaption")


def recaption(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RECAPTION, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--pipeline", "nope.yaml"], "pipeline file not found: nope.yaml"),
        (
            ["run", "--pipeline", "pipelines/default.yaml", "--set", "captioner.modle=x"],
            "unknown config key 'captioner.modle'",
        ),
        (
            ["run", "--pipeline", "pipelines/default.yaml", "--input", "/no/such/shards"],
            "input path does not exist",
        ),
        (["report", "/no/such/corpus"], "no manifest.json"),
        (
            ["run", "--pipeline", "defualt"],
            "pipeline file not found: defualt (bundled pipelines: azure, default, local-vlm, "
            "openai, openai-batch, vllm)",
        ),
        (["pipelines", "show", "nope"], "no bundled pipeline 'nope'"),
        (["run", "--pipeline", "default", "--progress-every", "0"], "--progress-every 0.0"),
    ],
)
def test_errors_are_one_line_and_non_zero(args, message):
    result = recaption(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"recaption: error: {result.stderr.strip().split('error: ', 1)[1]}"
    ]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_dead_local_ray_that_left_its_address_is_not_joined(tmp_path):
    """`ray start` writes the head's address to /tmp/ray/ray_current_cluster, and a head that
    died (a crash, a kill) leaves it there: a run starts a Ray of its own regardless."""
    marker = Path("/tmp/ray/ray_current_cluster")
    before = marker.read_text() if marker.exists() else None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("127.0.0.1:9")  # nothing listens there
    try:
        shards = tmp_path / "shards"
        assert (
            recaption("samples", str(shards), "--shards", "1", "--per-shard", "4").returncode == 0
        )
        result = recaption(
            *("run", "--pipeline", "default", "--input", str(shards)),
            *("--output", str(tmp_path / "corpus"), "--set", "ray.workers=1", "--quiet"),
        )
    finally:
        if before is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_text(before)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recaption: samples: 4 -> " in result.stdout


def test_samples_run_report_from_the_command_line(ray_cluster, tmp_path):
    shards, corpus = tmp_path / "shards", tmp_path / "corpus"
    assert recaption("samples", str(shards), "--shards", "1", "--per-shard", "8").returncode == 0
    # Joins the test session's Ray cluster through ray.address, as a batch job would.
    result = recaption(
        "run",
        "--pipeline",
        "pipelines/default.yaml",
        "--input",
        str(shards),
        "--output",
        str(corpus),
        "--set",
        f"ray.address={ray_cluster}",
        "--set",
        "ray.workers=1",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "recaption: samples: 8 -> " in result.stdout and f"corpus: {corpus}" in result.stdout
    assert (
        pq.read_metadata(corpus / "data" / "00000.parquet").num_rows
        + pq.read_metadata(corpus / "rejected" / "00000.parquet").num_rows
        == 8
    )

    report = recaption("report", str(corpus))
    assert report.returncode == 0
    assert f"report written to {corpus / 'report' / 'index.html'}" in report.stdout
    page = (corpus / "report" / "index.html").read_text()
    captions = pq.read_table(
        corpus / "data" / "00000.parquet", columns=["caption", "alt_text"]
    ).to_pylist()
    assert page.count('<img src="thumbs/') == len(captions)  # fewer rows than --sample
    assert captions[0]["caption"].split(".")[0] in page


def test_version_and_the_bundled_pipelines(capsys):
    from recaption import __version__
    from recaption.cli import main

    assert recaption("--version").stdout.strip() == f"recaption {__version__}"
    assert __version__ == metadata.version("recaption")
    listed = recaption("pipelines").stdout.splitlines()
    names = [line.split()[0] for line in listed if line and not line.startswith("`")]
    assert names == ["azure", "default", "local-vlm", "openai", "openai-batch", "vllm"]
    for name in names:  # the repository's pipelines/ is what ships: one copy
        assert main(["pipelines", "show", name]) == 0
        assert capsys.readouterr().out == (Path("pipelines") / f"{name}.yaml").read_text()
        assert load_config(name) == load_config(f"pipelines/{name}.yaml")


def test_import_recaption_loads_no_ray():
    code = "import sys, recaption; recaption.load_config; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_the_python_api_is_the_command(ray_cluster, sample_shards, tmp_path):
    import recaption as api

    corpus = tmp_path / "corpus"
    summary = api.run(
        "default",
        {"input.path": sample_shards, "output.path": corpus, "ray.workers": 1},
        progress=False,
    )
    assert isinstance(summary, api.RunSummary) and not summary.failed
    assert summary.totals.samples == 48 and len(summary.finished) == 2
    assert api.corpus_status(corpus)["state"] == "finished"
    # a config object with overrides; a value that YAML would misread stays a string
    cfg = api.load_config("default", [f"input.path={sample_shards}"])
    again = api.run(cfg, {"output.path": corpus}, progress="off")
    assert again.skipped == 2 and not again.finished  # committed: nothing to do
    assert api.api.config(cfg, {"captioner.model": "null"}).captioner.model == "null"
    with pytest.raises(ConfigError, match=r"unknown config key 'ray\.wokers'"):
        api.run(cfg, ["ray.wokers=2"])
