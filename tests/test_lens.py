"""The bundled Lens trainer on a corpus the pipeline makes here: training, resume after a
kill, sampling, the caption mix, the text cache."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from recaption.cli import main
from recaption.config import ConfigError, load_config
from recaption.lens.config import SOURCE_COLUMNS, load_lens_config
from recaption.lens.data import DROPPED, CorpusStream
from recaption.lens.model import MMDiT
from recaption.lens.sample import generate, load_run
from recaption.lens.text import TextEncoder
from recaption.lens.train import learning_rate, make_optimizers, train
from recaption.pipeline import run
from recaption.samples import write_samples

# small enough for a few steps a second on a CPU; the trainer code is the real one
TINY = [
    "model.width=32",
    "model.depth=2",
    "model.heads=2",
    "batch_size=8",
    "text.max_tokens=24",
    "warmup_steps=5",
    "log_every=1",
    "sample.every=0",
    "sample.per_prompt=2",
    "sample.steps=4",
    "sample.prompts=[a red circle, a blue square]",
]


@pytest.fixture(scope="module")
def corpus(ray_cluster, tmp_path_factory) -> Path:
    """A dozen images captioned by the analyzer, in row groups of 4 (so resuming a stream
    crosses row-group boundaries)."""
    shards = tmp_path_factory.mktemp("lens-shards")
    write_samples(shards, shards=1, per_shard=14, seed=5)
    out = tmp_path_factory.mktemp("lens") / "corpus"
    cfg = load_config(
        "pipelines/default.yaml",
        [f"input.path={shards}", f"output.path={out}", "output.row_group_size=4"],
    )
    assert not run(cfg, show_progress=False).failed
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text-cache")


def cfg(*overrides: str):
    return load_lens_config("tiny", [*TINY, *overrides])


def test_loss_is_finite_and_falls_when_overfitting(corpus, cache, tmp_path):
    summary = train(
        str(corpus),
        cfg("steps=80", "lr=3e-3", "data.caption_dropout=0"),
        tmp_path / "run",
        cache,
        progress=False,
    )
    losses = summary.losses
    assert len(losses) == 80 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    out = tmp_path / "run"
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "samples" / "step-0000080.png").exists()
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(metrics) == 80


def test_the_cosine_schedule_warms_up_then_falls_to_zero_at_the_last_step(corpus, cache, tmp_path):
    c = cfg("steps=12", "lr=1e-3", "warmup_steps=3", "lr_schedule=cosine")
    train(str(corpus), c, tmp_path / "run", cache, progress=False)
    logged = [json.loads(line)["lr"] for line in _lines(tmp_path / "run" / "metrics.jsonl")]
    assert logged == pytest.approx([learning_rate(c, step) for step in range(12)])
    assert logged[0] < logged[1] < logged[2]  # the warm-up
    assert all(a > b for a, b in itertools.pairwise(logged[2:]))  # then only down
    assert logged[-1] < 0.02 * c.lr
    # the constant schedule after the same warm-up
    flat = cfg("steps=12", "lr=1e-3", "warmup_steps=3")
    assert [learning_rate(flat, step) for step in range(2, 12)] == [1e-3] * 10


def test_a_time_budget_ends_the_run_and_its_schedule_together(corpus, cache, tmp_path):
    """`minutes`: the cosine follows the training clock, so it reaches 0 when the budget ends
    whatever the machine's pace, and a paused run (--max-minutes) goes on with the clock it
    checkpointed."""
    c = cfg("steps=1000000", "minutes=0.05", "warmup_steps=2", "lr_schedule=cosine")
    run_dir = tmp_path / "run"
    paused = train(str(corpus), c, run_dir, cache, progress=False, max_seconds=1.0)
    rest = train(str(corpus), c, run_dir, cache, progress=False)
    assert rest.resumed_from == paused.steps > 0 and rest.steps < 1_000_000
    rows = [json.loads(line) for line in _lines(run_dir / "metrics.jsonl")]
    trained = sum(1 / r["steps_per_s"] for r in rows)  # log_every=1: a row a step
    assert 3.0 <= trained < 3.0 + 5 * max(1 / r["steps_per_s"] for r in rows)
    lrs = [r["lr"] for r in rows]
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))  # no restart at the resume
    assert lrs[-1] < 0.02 * c.lr
    state = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert state["seconds"] == pytest.approx(trained, rel=1e-3)
    # done: a further call trains nothing
    assert train(str(corpus), c, run_dir, cache, progress=False).losses == []


def test_a_killed_run_resumes_with_the_uninterrupted_next_losses(corpus, cache, tmp_path):
    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "recaption.cli", "lens", "train", "--quiet"]
    argv += ["--corpus", str(corpus), "--out", str(killed), "--cache-dir", str(cache)]
    argv += ["--steps", "1000"]
    for item in [*TINY, "checkpoint_every=3"]:
        argv += ["--set", item]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((killed / "checkpoints").glob("step-*.pt")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint in 2 minutes"
        time.sleep(0.02)
    time.sleep(0.3)  # let it run on past the checkpoint, as a real kill would
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    last = int(sorted((killed / "checkpoints").glob("step-*.pt"))[-1].stem.split("-")[1])

    resumed = train(str(corpus), cfg(f"steps={last + 3}"), killed, cache, progress=False)
    straight = train(
        str(corpus), cfg(f"steps={last + 3}"), tmp_path / "straight", cache, progress=False
    )
    assert resumed.resumed_from == last and len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(straight.losses[last:], rel=1e-6, abs=0)
    # what the killed run logged past its checkpoint was dropped, then redone
    steps = [json.loads(line)["step"] for line in _lines(killed / "metrics.jsonl")]
    assert steps == list(range(1, last + 4))


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_paused_run_resumes_with_its_optimizers_states(corpus, cache, tmp_path, optimizer):
    """Muon keeps the blocks' matrices and AdamW the rest: both states are checkpointed, so a
    resumed run takes the steps an uninterrupted one would. A checkpoint from before the split
    (one AdamW state, not a list) resumes too."""
    c = (f"optimizer={optimizer}", "checkpoint_every=2", "lr=3e-3")
    train(str(corpus), cfg("steps=2", *c), tmp_path / "paused", cache, progress=False)
    if optimizer == "adamw":  # the checkpoint as runs wrote it before `optimizer` existed
        path = tmp_path / "paused" / "checkpoints" / "step-0000002.pt"
        state = torch.load(path, weights_only=True)
        (state["optimizer"],) = state["optimizer"]
        torch.save(state, path)
    resumed = train(str(corpus), cfg("steps=5", *c), tmp_path / "paused", cache, progress=False)
    straight = train(str(corpus), cfg("steps=5", *c), tmp_path / "straight", cache, progress=False)
    assert resumed.resumed_from == 2
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-6, abs=0)


def test_muon_takes_the_blocks_matrices_and_adamw_every_other_weight():
    model = MMDiT(cfg().model, text_dim=48, text_layers=3)
    muon, adamw = make_optimizers(model, cfg("optimizer=muon"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    held = [p for o in (muon, adamw) for g in o.param_groups for p in g["params"]]
    assert sorted(map(id, held)) == sorted(id(p) for p in model.parameters())  # each once
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    assert in_muon and all(n.startswith("blocks.") for n in in_muon)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert "blocks.0.image.qkv.weight" in in_muon and "patch_out.weight" not in in_muon


def test_a_run_resumes_only_with_the_same_settings(corpus, cache, tmp_path):
    train(str(corpus), cfg("steps=2"), tmp_path / "run", cache, progress=False)
    with pytest.raises(ConfigError, match="model"):
        train(str(corpus), cfg("steps=4", "model.depth=3"), tmp_path / "run", cache, progress=False)
    # a run written before keys were added (their defaults then) resumes
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    del record["config"]["model"]["positions"], record["config"]["minutes"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    resumed = train(str(corpus), cfg("steps=4"), tmp_path / "run", cache, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4


def test_sampling_writes_images_of_the_right_shape(corpus, cache, tmp_path):
    train(str(corpus), cfg("steps=3"), tmp_path / "run", cache, progress=False)
    loaded = load_run(tmp_path / "run", "cpu", cache)
    images = generate(loaded.model, loaded.encoder, ["a red circle", "a blue square"], 3, 4.0, 4)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 0
    again = generate(loaded.model, loaded.encoder, ["a red circle", "a blue square"], 3, 4.0, 4)
    assert np.array_equal(images, again)  # the seed fixes the noise

    out = tmp_path / "samples"
    argv = ["lens", "sample", "--run", str(tmp_path / "run"), "--cache-dir", str(cache)]
    argv += ["--prompt", "a red circle", "--prompt", "a green star", "--n", "2", "--steps", "3"]
    code = main([*argv, "--out", str(out)])
    assert code == 0
    pngs = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 4
    for path in pngs:
        with Image.open(path) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert (out / "grid.png").exists()


def test_caption_mix_ratios_are_honoured(corpus):
    mix = {"dense": 0.6, "short": 0.3, "alt": 0.1}
    data = load_lens_config("tiny", [f"data.caption_mix={mix}", "data.caption_dropout=0.1"]).data
    stream = CorpusStream(str(corpus), data, image_size=8)
    table = pq.read_table(corpus / "data", columns=list(SOURCE_COLUMNS.values()))
    texts = {s: {t or "" for t in table.column(c).to_pylist()} for s, c in SOURCE_COLUMNS.items()}
    draws = 4000
    counts: Counter = Counter()
    examples = stream.examples()
    for _ in range(draws):
        image, caption, source = next(examples)
        counts[source] += 1
        assert image.shape == (8, 8, 3)
        assert caption == "" if source == DROPPED else caption in texts[source]
    expected = {s: 0.9 * share for s, share in mix.items()} | {DROPPED: 0.1}
    for source, p in expected.items():
        sigma = (draws * p * (1 - p)) ** 0.5
        assert abs(counts[source] - draws * p) < 5 * sigma, (source, counts)
    assert stream.drawn == counts


def test_a_stream_resumes_at_its_position(corpus):
    data = load_lens_config("tiny", ["data.shuffle_buffer=5"]).data
    whole = CorpusStream(str(corpus), data, image_size=8, seed=3)
    it = whole.examples()
    rows = whole.rows
    for _ in range(rows + 4):  # into the second epoch
        next(it)
    state = (whole.epoch, whole.consumed)
    expected = [next(it) for _ in range(rows)]

    resumed = CorpusStream(f"file://{corpus}", data, image_size=8, seed=3)  # a pyarrow URI
    resumed.epoch, resumed.consumed = state
    got = [x for _, x in zip(range(rows), resumed.examples(), strict=False)]
    assert [(c, s) for _, c, s in got] == [(c, s) for _, c, s in expected]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, expected, strict=True))


def test_an_undecodable_image_is_skipped_and_counted(tmp_path):
    (tmp_path / "data").mkdir()
    good = [png(color) for color in ((255, 0, 0), (0, 0, 255))]
    table = pa.table({"image": [good[0], b"not an image", good[1]], "caption": ["r", "x", "b"]})
    pq.write_table(table, tmp_path / "data" / "00000.parquet")
    data = load_lens_config("tiny", ["data.caption_dropout=0"]).data
    stream = CorpusStream(str(tmp_path), data, image_size=4)
    it = stream.examples()
    got = sorted(next(it)[1] for _ in range(4))  # two epochs
    assert got == ["b", "b", "r", "r"]
    assert stream.drawn == {"dense": 4, "undecodable": 2}


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def test_text_features_are_cached_per_caption(tmp_path):
    text = load_lens_config("tiny", ["text.max_tokens=8"]).text
    first = TextEncoder(text, tmp_path, torch.device("cpu"))
    captions = ["a red circle", "a very long caption " * 10, "a red circle"]
    a = first(captions)
    assert first.encoded == 2  # the repeated caption is encoded once
    assert a.tokens.shape == (3, 8, 384 * 3) and a.truncated == [False, True, False]
    assert a.mask.sum(1).tolist() == [5, 8, 5]  # [CLS] a red circle [SEP]

    second = TextEncoder(text, tmp_path, torch.device("cpu"))
    b = second(captions)
    assert second.encoded == 0
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)


def test_padding_tokens_do_not_change_the_prediction():
    torch.manual_seed(0)
    model = MMDiT(load_lens_config("tiny", TINY).model, text_dim=12).eval()
    for p in model.parameters():  # adaLN-Zero starts at identity; wake every weight up
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    text, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    padded = torch.cat([text, torch.randn(2, 3, 12)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(x, t, text, mask), model(x, t, padded, padded_mask), atol=1e-5)
        assert not torch.allclose(model(x, t, text, mask), model(x, t, padded, padded_mask | True))


def test_train_errors_are_one_line(tmp_path, capsys):
    assert main(["lens", "train", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no corpus shards" in capsys.readouterr().err


def test_the_data_side_does_not_import_torch():
    code = "import sys, recaption.cli, recaption.pipeline, recaption.lens.data; "
    code += "sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line]
