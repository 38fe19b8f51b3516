import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import scene_jpeg, write_metadata, write_tar

from recaption.records import Reason
from recaption.sources import InputError, list_shards, read_samples
from recaption.sources.webdataset import split_member_name


def by_key(shard):
    return {s.key: s for s in read_samples(shard)}


def test_member_names_split_like_webdataset():
    assert split_member_name("000000001.jpg") == ("000000001", "jpg")
    assert split_member_name("a/b/000000001.seg.PNG") == ("a/b/000000001", "seg.png")
    assert split_member_name("../../x.jpg") == ("../../x", "jpg")


def test_sample_shards_have_img2dataset_layout(sample_shards):
    names = sorted(p.name for p in sample_shards.iterdir())
    assert names == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
    ]
    meta = pq.read_table(sample_shards / "00000.parquet")
    assert {"key", "url", "caption", "status", "error_message", "width", "height", "sha256"} <= set(
        meta.column_names
    )
    assert all(len(k) == 9 and k.isdigit() for k in meta.column("key").to_pylist())
    shards = list_shards(sample_shards)
    assert [(s.id, s.format) for s in shards] == [("00000", "webdataset"), ("00001", "webdataset")]
    samples = list(read_samples(shards[0]))
    assert len(samples) == meta.num_rows  # every URL, downloaded or not
    failed = [s for s in samples if s.error]
    assert failed and all(s.error[0] == Reason.download_failed for s in failed)


def test_hostile_tar(hostile_shards):
    root, keys = hostile_shards
    shard = list_shards(root)[0]
    samples = list(read_samples(shard))
    seen = [s.key for s in samples]
    assert set(seen) == keys["00000"]
    assert seen.count("000000000") == 2  # the repeat is reported, not dropped
    first, repeat = (s for s in samples if s.key == "000000000")
    assert first.alt_text == "red square" and first.url == "https://e.example/0.jpg" and first.image
    assert repeat.error[0] == Reason.duplicate_key and repeat.image is None
    by = {s.key: s for s in samples if not (s.key == "000000000" and s.error)}
    assert by["000000005"].error[0] == Reason.missing_image
    assert by["000000001"].image == b"" and by["000000001"].error is None  # decode stage decides
    assert by["../../escape"].alt_text == "path traversal"


def test_truncated_tar_keeps_complete_samples(hostile_shards):
    root, keys = hostile_shards
    shard = list_shards(root)[1]
    samples = by_key(shard)
    assert set(samples) == keys["00001"]
    for i in range(3):
        assert (
            samples[f"00001000{i}"].error is None
            and samples[f"00001000{i}"].alt_text == f"sample {i}"
        )
    assert samples["000010003"].error[0] == Reason.truncated_member
    assert {samples[k].error[0] for k in ("000010004", "000010005")} == {Reason.missing_from_tar}
    assert samples["000010006"].error[0] == Reason.download_failed


def test_img2dataset_parquet_format(tmp_path):
    rows = [
        {
            "key": "000000000",
            "url": "u0",
            "caption": "alt",
            "status": "success",
            "jpg": scene_jpeg(),
        },
        {
            "key": "000000001",
            "url": "u1",
            "caption": None,
            "status": "failed_to_download",
            "jpg": None,
        },
        {"key": "000000002", "url": "u2", "caption": None, "status": "success", "jpg": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "00000.parquet")
    (shard,) = list_shards(tmp_path)
    assert shard.format == "parquet" and shard.expected_samples() == 3
    samples = by_key(shard)
    assert samples["000000000"].image and samples["000000000"].alt_text == "alt"
    assert samples["000000001"].error[0] == Reason.download_failed
    assert samples["000000002"].error[0] == Reason.missing_image


def test_metadata_parquet_is_not_a_shard_of_its_own(tmp_path):
    write_tar(tmp_path / "00000.tar", [("000000000.jpg", scene_jpeg())])
    write_metadata(tmp_path / "00000.parquet", [{"key": "000000000", "status": "success"}])
    assert [(s.id, s.format) for s in list_shards(tmp_path)] == [("00000", "webdataset")]


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_unusable_input_root(tmp_path, make):
    root = tmp_path / "in"
    if make == "file":
        root.write_text("x")
    elif make == "empty":
        root.mkdir()
    with pytest.raises(InputError):
        list_shards(root)
