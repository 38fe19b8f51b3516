"""Input from object storage: a real S3-compatible server (moto's server mode) on loopback,
read through pyarrow's S3 filesystem by the driver and by Ray workers."""

from pathlib import Path

import pyarrow.fs as pafs
import pytest
from test_openai import expected_keys
from test_pipeline import assert_invariant

from recaption.config import load_config
from recaption.pipeline import run
from recaption.sources import list_shards, read_samples


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(uri prefix of a fresh bucket, its filesystem); credentials are fake, traffic local."""
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "fake-key-id",
        "AWS_SECRET_ACCESS_KEY": "fake-secret",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address
    }.items():
        mp.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://corpora?{query}&allow_bucket_creation=true")
    fs.create_dir("corpora")
    yield (lambda path: f"s3://corpora/{path}?{query}"), fs
    server.stop()
    mp.undo()


def upload(fs: pafs.FileSystem, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            with fs.open_output_stream(
                f"corpora/{prefix}/{path.relative_to(local).as_posix()}"
            ) as out:
                out.write(path.read_bytes())


def test_shards_in_s3_read_like_local_ones(s3, sample_shards):
    uri, fs = s3
    upload(fs, sample_shards, "web")
    remote = list_shards(uri("web"))
    local = list_shards(sample_shards)
    assert [(s.id, s.format) for s in remote] == [(s.id, s.format) for s in local]
    assert [s.expected_samples() for s in remote] == [s.expected_samples() for s in local]
    for there, here in zip(remote, local, strict=True):
        ours = [(x.key, x.url, x.alt_text, x.image, x.error) for x in read_samples(there)]
        assert ours == [(x.key, x.url, x.alt_text, x.image, x.error) for x in read_samples(here)]


def test_a_run_on_ray_reads_its_input_from_s3(ray_cluster, s3, sample_shards, tmp_path):
    uri, fs = s3
    upload(fs, sample_shards, "run-input")
    corpus = tmp_path / "corpus"
    cfg = load_config(
        "pipelines/default.yaml", [f"input.path={uri('run-input')}", f"output.path={corpus}"]
    )
    summary = run(cfg, show_progress=False)
    assert len(summary.finished) == 2 and not summary.failed
    assert_invariant(corpus, expected_keys(sample_shards))


def test_a_plain_image_folder_in_s3(s3, tmp_path):
    from conftest import jpeg_bytes

    uri, fs = s3
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "one.jpg").write_bytes(jpeg_bytes())
    (folder / "a" / "one.txt").write_text("first photo")
    (folder / "two.png").write_bytes(jpeg_bytes((40, 40)))
    upload(fs, folder, "photos")
    shards = list_shards(uri("photos"))
    assert [(s.format, s.members) for s in shards] == [("folder", ("a/one.jpg", "two.png"))]
    samples = {x.key: x for x in read_samples(shards[0])}
    assert samples["a/one"].alt_text == "first photo" and samples["two"].alt_text is None
    assert samples["two"].image == jpeg_bytes((40, 40))


def test_a_corpus_written_to_s3_is_published_whole_and_resumes(
    ray_cluster, s3, sample_shards, tmp_path
):
    uri, fs = s3
    staging = tmp_path / "staging"
    cfg = load_config(
        "pipelines/default.yaml",
        [
            f"input.path={sample_shards}",
            f"output.path={uri('out/corpus')}",
            f"output.staging={staging}",
        ],
    )
    summary = run(cfg, show_progress=False)
    assert len(summary.finished) == 2
    objects = sorted(
        info.path.removeprefix("corpora/out/corpus/")
        for info in fs.get_file_info(pafs.FileSelector("corpora/out/corpus", recursive=True))
        if info.type == pafs.FileType.File
    )
    assert objects == [
        "commits/00000.json",
        "commits/00001.json",
        "data/00000.parquet",
        "data/00001.parquet",
        "manifest.json",
        "rejected/00000.parquet",
        "rejected/00001.parquet",
    ]
    # what was staged went to the store: no shard file or journal line stays behind
    assert not list(staging.rglob("*.parquet")) and not list(staging.rglob("*.jsonl"))
    local = tmp_path / "downloaded"
    for name in objects:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"corpora/out/corpus/{name}") as fh:
            (local / name).write_bytes(fh.read())
    assert_invariant(local, expected_keys(sample_shards))
    # the manifest in the store is the record: a second run finds every shard done
    again = run(cfg, show_progress=False)
    assert again.skipped == 2 and not again.finished
