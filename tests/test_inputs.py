"""Every input shape a data engineer has: img2dataset `files` output, plain image folders
with sidecar alt text, parquet tables with image bytes (Hugging Face's shape), and trial
selections (--shards, --limit, --fraction)."""

import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes
from test_pipeline import assert_invariant

from recaption.config import load_config
from recaption.pipeline import RunError, run
from recaption.sources import InputError, input_shards, list_shards, read_samples


def keys_of(shards):
    return {s.id: {x.key for x in read_samples(s)} for s in shards}


def test_img2dataset_files_output_reads_like_its_tars(sample_shards, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for tar_path in sorted(sample_shards.glob("*.tar")):
        folder = files / tar_path.stem
        folder.mkdir()
        with tarfile.open(tar_path) as tar:
            for member in tar:
                (folder / member.name).write_bytes(tar.extractfile(member).read())
        shutil.copy(tar_path.with_suffix(".parquet"), files / f"{tar_path.stem}.parquet")
    shards = list_shards(files)
    assert [s.format for s in shards] == ["files", "files"]
    original = list_shards(sample_shards)
    as_files = {
        s.id: [(x.key, x.alt_text, x.image, x.error) for x in read_samples(s)] for s in shards
    }
    as_tars = {
        s.id: [(x.key, x.alt_text, x.image, x.error) for x in read_samples(s)] for s in original
    }
    assert as_files == as_tars  # failed downloads from the parquet included


def test_a_plain_image_folder_with_sidecar_alt_text(ray_cluster, tmp_path):
    root = tmp_path / "photos"
    (root / "cats" / "indoor").mkdir(parents=True)
    (root / "dogs").mkdir()
    for i in range(4):
        (root / "cats" / f"c{i}.jpg").write_bytes(jpeg_bytes((80, 60), (30 * i, 90, 160)))
    (root / "cats" / "c0.txt").write_text("a grey cat on a sofa\n")
    (root / "cats" / "indoor" / "sleepy.png").write_bytes(jpeg_bytes((64, 64)))
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.md").write_text("not an image")
    shards = list_shards(root, images_per_shard=4)
    assert [(s.id, s.format, len(s.members)) for s in shards] == [
        ("00000", "folder", 4),
        ("00001", "folder", 2),
    ]
    samples = {x.key: x for s in shards for x in read_samples(s)}
    assert set(samples) == {
        "cats/c0",
        "cats/c1",
        "cats/c2",
        "cats/c3",
        "cats/indoor/sleepy",
        "dogs/broken",
    }
    assert samples["cats/c0"].alt_text == "a grey cat on a sofa"
    assert samples["cats/c1"].alt_text is None and samples["cats/c1"].url == "cats/c1.jpg"

    corpus = tmp_path / "corpus"
    cfg = load_config(
        "pipelines/default.yaml",
        [f"input.path={root}", f"output.path={corpus}", "input.images_per_shard=4"],
    )
    run(cfg, show_progress=False)
    assert_invariant(corpus, keys_of(shards))
    rejected = pq.read_table(corpus / "rejected").to_pylist()
    assert [(r["key"], r["stage"]) for r in rejected] == [("dogs/broken", "decode")]


def test_a_hugging_face_style_parquet_table(ray_cluster, tmp_path):
    root = tmp_path / "hf"
    root.mkdir()
    images = [
        {"bytes": jpeg_bytes((72, 48), (i * 40, 80, 80)), "path": f"{i}.jpg"} for i in range(5)
    ]
    images[3] = {"bytes": None, "path": "gone.jpg"}
    table = pa.table(
        {
            "id": list(range(100, 105)),
            "img": images,
            "text": [f"web alt text {i}" for i in range(5)],
        }
    )
    pq.write_table(table, root / "train-00000-of-00001.parquet")
    corpus = tmp_path / "corpus"
    cfg = load_config(
        "pipelines/default.yaml",
        [
            f"input.path={root}",
            f"output.path={corpus}",
            "input.image_col=img",
            "input.caption_col=text",
            "input.key_col=id",
        ],
    )
    run(cfg, show_progress=False)
    rows = pq.read_table(corpus / "data", columns=["key", "alt_text"]).to_pylist()
    assert sorted((r["key"], r["alt_text"]) for r in rows) == [
        (str(100 + i), f"web alt text {i}") for i in (0, 1, 2, 4)
    ]
    rejected = pq.read_table(corpus / "rejected").to_pylist()
    assert [(r["key"], r["reason"]) for r in rejected] == [("103", "missing_image")]


def test_trial_selections(ray_cluster, sample_shards, tmp_path):
    def cfg(corpus, *overrides):
        return load_config(
            "pipelines/default.yaml",
            [f"input.path={sample_shards}", f"output.path={corpus}", *overrides],
        )

    everything = keys_of(list_shards(sample_shards))
    assert [s.id for s in input_shards(cfg(tmp_path / "x", "input.shards=1").input)] == ["00001"]
    limited = input_shards(cfg(tmp_path / "x", "input.limit=30").input)
    assert [len(list(read_samples(s))) for s in limited] == [24, 6]
    half = keys_of(input_shards(cfg(tmp_path / "x", "input.fraction=0.5").input))
    again = keys_of(input_shards(cfg(tmp_path / "x", "input.fraction=0.5").input))
    assert half == again  # the same keys on every run
    for sid, keys in half.items():
        assert keys < everything[sid] and 4 <= len(keys) <= 20

    corpus = tmp_path / "trial"
    summary = run(cfg(corpus, "input.limit=30"), show_progress=False)
    assert summary.samples == 30
    with pytest.raises(RunError, match="another input selection"):
        run(cfg(corpus), show_progress=False)
    with pytest.raises(InputError, match="0-1"):
        input_shards(cfg(tmp_path / "x", "input.shards=0-5").input)
