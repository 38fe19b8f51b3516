"""Procedural scenes with ground truth, and caption fidelity measured against it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from recaption.cli import main
from recaption.colors import PALETTE
from recaption.config import load_config
from recaption.fidelity import Tally, parse
from recaption.grid import PLACES, cell_of, position_phrase
from recaption.pipeline import run
from recaption.samples import write_scenes
from recaption.scenes import CELLS, HELD_OUT, SCENES, random_scene, render


def test_scenes_are_deterministic(tmp_path):
    for name in ("a", "b"):
        write_scenes(tmp_path / name, 30, per_shard=20, seed=4)
    for file in ("00000.tar", "00001.tar", "00000.parquet", "truth.jsonl"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    write_scenes(tmp_path / "c", 30, per_shard=20, seed=5)
    assert (tmp_path / "a" / "truth.jsonl").read_bytes() != (
        tmp_path / "c" / "truth.jsonl"
    ).read_bytes()


def test_the_ground_truth_is_what_is_rendered():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng, SCENES)
        pixels = np.asarray(render(scene)).astype(int)
        truth = scene.truth()
        assert truth["count"] == len(scene.shapes) == len(truth["shapes"]) <= 3
        for shape in truth["shapes"]:
            assert (shape["color"], shape["kind"]) not in HELD_OUT
            x, y = int(shape["cx"] * scene.width), int(shape["cy"] * scene.height)
            assert tuple(pixels[y, x]) == PALETTE[shape["color"]], shape
            row, col = min(2, int(shape["cy"] * 3)), min(2, int(shape["cx"] * 3))
            assert shape["cell"] == CELLS[(row, col)]
        corner = pixels[1, 1]  # corners are never covered: shapes stay inside their cells
        bg = np.array(PALETTE[scene.background])
        assert np.abs(corner - bg).max() <= (0 if scene.texture == "plain" else 16)


def test_the_grid_words_a_place_the_same_everywhere():
    """The analyzer's phrase for a cell is read back by the parser as the ground truth's name."""
    for (row, col), name in CELLS.items():
        cx, cy = (col + 0.5) / 3, (row + 0.5) / 3
        assert cell_of(cx, cy) == name
        assert position_phrase(cx, cy) == PLACES[name]
        assert parse(f"a red circle {PLACES[name]}").positions == {("red", "circle", name)}


def test_the_parser_reads_known_statements():
    truth = {
        "background": "white",
        "count": 2,
        "shapes": [
            {"kind": "circle", "color": "red", "cell": "top left"},
            {"kind": "square", "color": "blue", "cell": "bottom right"},
        ],
    }
    said = parse(
        "A flat graphic showing two shapes on a plain white background. There is a small red "
        "circle in the top left and a large green square at the bottom. The red circle is above "
        "the green square."
    )
    assert said.shapes == {("red", "circle"), ("green", "square")}
    assert said.positions == {("red", "circle", "top left"), ("green", "square", "bottom")}
    assert (said.count, said.background) == (2, "white")
    tally = Tally()
    tally.add(said, truth)
    tally.add(parse("IMG_2041.jpg"), truth)  # states nothing
    tally.add(parse("Blue Circles Wall Art | grey background"), truth)  # half wrong
    result = tally.result()
    assert result["kind"] == {"precision": 3 / 3, "recall": 3 / 6}
    assert result["color"] == {"precision": 2 / 3, "recall": 2 / 6}
    assert result["position"] == {"precision": 1 / 2, "recall": 1 / 6}
    assert result["count"] == {"precision": 1.0, "recall": 1 / 3}
    assert result["background"] == {"precision": 1 / 2, "recall": 1 / 3}


def test_analyzer_captions_state_the_scenes_and_alt_text_does_not(ray_cluster, tmp_path):
    scenes, corpus = tmp_path / "scenes", tmp_path / "corpus"
    assert main(["scenes", str(scenes), "--n", "60", "--per-shard", "30", "--seed", "2"]) == 0
    cfg = load_config("pipelines/default.yaml", [f"input.path={scenes}", f"output.path={corpus}"])
    assert not run(cfg, show_progress=False).failed
    out = tmp_path / "fidelity.json"
    argv = ["eval", "captions", "--corpus", str(corpus), "--truth", str(scenes)]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["captioned"] == 60
    for attribute in ("kind", "color", "position"):
        assert result["captions"][attribute]["precision"] >= 0.95, attribute
        assert result["captions"][attribute]["recall"] >= 0.95, attribute
        assert result["alt_text"][attribute]["recall"] < 0.5, attribute


@pytest.mark.parametrize("missing", ["corpus", "truth"])
def test_eval_errors_are_one_line(tmp_path, capsys, missing):
    write_scenes(tmp_path / "truth", 2, per_shard=2)
    paths = {"corpus": tmp_path / "corpus", "truth": tmp_path / "truth"}
    paths[missing] = Path(tmp_path / "nowhere")
    argv = ["eval", "captions", "--corpus", str(paths["corpus"]), "--truth", str(paths["truth"])]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
