"""Bad input as a new user meets it: every case ends in one line on stderr and exit 2 (or,
for `verify`, a verdict), never a traceback, and leaves nothing behind that it should not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes

from recaption.config import load_config, redacted
from recaption.pipeline import RunError, run
from recaption.samples import write_samples
from recaption.verify import verify

RECAPTION = str(Path(sys.executable).parent / "recaption")


def recaption(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RECAPTION, *args], capture_output=True, text=True, timeout=300, env=env)


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recaption: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_set_value_that_is_not_yaml(tmp_path):
    result = recaption(
        "run", "--pipeline", "pipelines/default.yaml", "--set", "input.path=@x", "--quiet"
    )
    one_line_error(result, "--set input.path", "'@x'", "quote it")


@pytest.fixture(scope="module")
def corpus(ray_cluster, sample_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    cfg = load_config(
        "pipelines/default.yaml", [f"input.path={sample_shards}", f"output.path={out}"]
    )
    assert not run(cfg, show_progress=False).failed
    return out


@pytest.mark.parametrize("damage", ["truncated", "not json", "not a manifest"])
def test_a_damaged_manifest_is_one_line_in_every_command(corpus, sample_shards, tmp_path, damage):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(corpus), str(broken)], check=True)
    manifest = broken / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(
        {
            "truncated": text[: len(text) // 2],
            "not json": "\x00\x01garbage",
            "not a manifest": "[]",
        }[damage]
    )
    for args in (
        ["run", "--pipeline", "pipelines/default.yaml", "--input", str(sample_shards)],
        ["report"],
        ["verify"],
        ["batches"],
    ):
        argv = [
            args[0],
            *(
                ["--output", str(broken), *args[1:], "--quiet"]
                if args[0] == "run"
                else [str(broken)]
            ),
        ]
        one_line_error(recaption(*argv), "manifest.json is damaged")


def test_a_damaged_data_file_is_one_line_when_a_run_reads_it_back(corpus, tmp_path):
    """A resumed run reads its committed shards' captions back for the duplicate index."""
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(corpus), str(broken)], check=True)
    (broken / "data" / "00000.parquet").write_bytes(b"PAR1 cut short")
    more = tmp_path / "more"  # the same shard ids and a third: the run has work to do
    write_samples(more, shards=3, per_shard=4, seed=5)
    cfg = load_config("pipelines/default.yaml", [f"input.path={more}", f"output.path={broken}"])
    with pytest.raises(RunError, match=r"cannot read .*00000\.parquet .*recaption verify") as info:
        run(cfg, show_progress=False)
    assert "\n" not in str(info.value)


def test_an_output_whose_lock_cannot_be_opened(sample_shards, tmp_path):
    out = tmp_path / "corpus"
    (out / ".lock").mkdir(parents=True)  # root may write anywhere: block the file itself
    result = recaption(
        "run", "--pipeline", "pipelines/default.yaml", "--input", str(sample_shards),
        "--output", str(out), "--quiet",
    )  # fmt: skip
    one_line_error(result, "cannot write to", str(out))


def test_a_missing_api_key_leaves_nothing_behind(sample_shards, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AZURE_OPENAI"))}
    out = tmp_path / "corpus"
    result = recaption(
        "run", "--pipeline", "pipelines/openai.yaml", "--input", str(sample_shards),
        "--output", str(out), "--quiet", env=env,
    )  # fmt: skip
    one_line_error(result, "set OPENAI_API_KEY")
    assert not out.exists()


@pytest.mark.parametrize(
    ("path", "hidden", "kept"),
    [
        (
            "https://acct.blob.core.windows.net/c/shards?sv=2022-11-02&ss=b&sig=AbC%2Bd3f",
            "AbC",
            "sv=2022-11-02",
        ),
        ("az://c/p?client_secret=s3cr3t&tenant_id=t1", "s3cr3t", "tenant_id=t1"),
        ("https://host/v1?api-key=k3y", "k3y", "https://host/v1"),
        ("s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http", None, "scheme=http"),
        ("https://user:pa55@host/x", "pa55", "https://host/x"),
        (
            "s3://b/x?X-Amz-Credential=AKIA1&X-Amz-Signature=f00&X-Amz-Security-Token=t0k",
            "AKIA1",
            "s3://b/x",
        ),
    ],
)
def test_secrets_in_uris_are_redacted(path, hidden, kept):
    written = json.dumps(redacted(load_config(None, [f"input.path={path}"])))
    assert kept in written
    if hidden is None:
        assert path in written
    else:
        assert hidden not in written
        assert "***" in written or "@" in path  # user:password@ is dropped whole
    if "Amz" in path:
        assert "f00" not in written and "t0k" not in written


@pytest.mark.parametrize(
    "selection", [["input.shards=1"], ["input.limit=5"], ["input.fraction=0.5"]]
)
def test_verify_accepts_a_trial_run(ray_cluster, sample_shards, tmp_path, selection):
    out = tmp_path / "corpus"
    cfg = load_config(
        "pipelines/default.yaml",
        [f"input.path={sample_shards}", f"output.path={out}", "captioner.ocr=never", *selection],
    )
    summary = run(cfg, show_progress=False)
    verdict = verify(out, str(sample_shards))
    assert verdict.ok, verdict.problems
    assert verdict.captioned + verdict.rejected == summary.samples < 48


def test_verify_accepts_every_input_format(ray_cluster, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        (photos / f"p{i}.jpg").write_bytes(jpeg_bytes((64, 48), (40 * i, 100, 150)))
    table = tmp_path / "table"
    table.mkdir()
    rows = [
        {"id": f"r{i}", "img": {"bytes": jpeg_bytes((32, 32))}, "text": "alt"} for i in range(4)
    ]
    pq.write_table(pa.Table.from_pylist(rows), table / "00000.parquet")
    for root, extra in (
        (photos, ["input.format=folder", "input.images_per_shard=2"]),
        (table, ["input.image_col=img", "input.key_col=id", "input.caption_col=text"]),
    ):
        out = tmp_path / f"corpus-{root.name}"
        cfg = load_config(
            "pipelines/default.yaml",
            [f"input.path={root}", f"output.path={out}", "captioner.ocr=never", *extra],
        )
        run(cfg, show_progress=False)
        result = recaption("verify", str(out), "--input", str(root))
        assert result.returncode == 0, result.stdout
        assert "OK" in result.stdout


def test_a_worker_that_cannot_start_stops_the_run(ray_cluster, sample_shards, tmp_path):
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # passes the check; loading it fails
    cfg = load_config(
        "pipelines/local-vlm.yaml",
        [
            f"input.path={sample_shards}",
            f"output.path={tmp_path / 'corpus'}",
            f"captioner.model_path={model}",
            "ray.workers=1",
            "ray.gpus_per_worker=0",
            "ray.cpus_per_worker=1",
        ],
    )
    with pytest.raises(RunError, match=r"a worker could not start: .*Error") as info:
        run(cfg, show_progress=False)
    assert "\n" not in str(info.value)
