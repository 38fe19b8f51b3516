"""The command as users run it: a subprocess, exit codes, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

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
    ],
)
def test_errors_are_one_line_and_non_zero(args, message):
    result = recaption(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"recaption: error: {result.stderr.strip().split('error: ', 1)[1]}"
    ]
    assert message in result.stderr and "Traceback" not in result.stderr


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
