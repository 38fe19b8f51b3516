"""Prompt-following evaluation: the held-out prompts, the detector, scoring, the ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from recaption import ablation
from recaption.fidelity import parse
from recaption.lens.detect import Detection, Found
from recaption.lens.eval import detector_accuracy, passes, person_agreement, read_labelled
from recaption.lens.prompts import CATEGORIES, Prompt, Want, geneval_prompts, read_prompts
from recaption.scenes import HELD_OUT
from tests.test_lens_prompts import shares_a_frame


def test_prompts_cover_the_categories_with_held_out_pairs():
    prompts = geneval_prompts()
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert read_prompts(Path("eval/prompts.jsonl")) == prompts  # the committed copy is current
    for p in prompts:
        coloured = {(w.color, w.kind) for w in p.wants if w.color}
        assert coloured <= HELD_OUT, p.short
        # the dense wording states exactly what the prompt wants, as a caption would
        said = parse(p.dense)
        assert {(w.color, w.kind) for w in p.wants if w.color} <= said.shapes
        assert said.count == len(p.wants)


def test_the_detector_reads_real_scenes_at_the_model_resolution():
    result = detector_accuracy(geneval_prompts(), image_size=32, scenes=300)
    assert result["scenes_exact"] >= 0.97
    assert result["prompts_pass"] == 1.0


def test_the_detector_reads_generated_images_as_a_person_does():
    """Generated shapes are a few colour units off, soft-edged and flecked; the detector
    must still read them as a person does (eval/detector/: 864 images of three seeds)."""
    prompts = geneval_prompts()
    for seed in range(3):
        png = Path(f"eval/detector/seed{seed}.png")
        result = person_agreement(prompts, *read_labelled(png, png.with_suffix(".labels")))
        assert result["images"] >= 280
        assert result["agreement"] >= 0.9, (seed, result)
        for category in ("single_object", "colors"):
            assert abs(result["detector"][category] - result["person"][category]) <= 0.05


def test_scoring_follows_geneval_rules():
    prompts = {p.short: p for p in geneval_prompts()}
    red_tri = Found("red", "triangle", "bottom left", 30)
    blue_circle = Found("blue", "circle", "right", 40)

    def shows(*found: Found) -> Detection:
        return Detection("white", list(found))

    assert passes(prompts["a photo of a triangle"], shows(red_tri))
    assert not passes(prompts["a photo of a circle"], shows(red_tri))
    assert passes(prompts["a photo of a circle and a triangle"], shows(red_tri, blue_circle))
    assert passes(prompts["a photo of a red triangle in the bottom left"], shows(red_tri))
    moved = Found("red", "triangle", "top", 30)
    assert not passes(prompts["a photo of a red triangle in the bottom left"], shows(moved))
    two = prompts["a photo of two triangles"]
    assert not passes(two, shows(red_tri))
    assert passes(two, shows(red_tri, moved))
    assert not passes(two, shows(red_tri, moved, Found("green", "triangle", "left", 30)))
    # colour attribution: each colour on its own kind, not swapped
    attr = next(p for p in geneval_prompts() if p.category == "color_attr")
    right = [Found(w.color, w.kind, "left", 30) for w in attr.wants]
    swapped = [Found(b.color, a.kind, "left", 30) for a, b in zip(right, right[::-1], strict=True)]
    assert passes(attr, shows(*right)) and not passes(attr, shows(*swapped))
    # one shape cannot answer for two wants
    two_circles = Prompt("two_object", "", "", [Want("circle"), Want("circle")])
    assert not passes(two_circles, shows(blue_circle))


def test_a_smoke_ablation_writes_the_report(ray_cluster, tmp_path):
    """`make ablation` in CI: every stage, every arm, two seeds of dense and alt, four styles."""
    tiny = ["model.width=32", "model.depth=1", "model.heads=2", "batch_size=8"]
    tiny += ["text.max_tokens=16", "warmup_steps=1"]
    argv = ["--out", str(tmp_path), "--scenes", "40", "--steps", "2", "--n", "3", "--euler", "2"]
    argv += ["--detector-scenes", "50"]
    for item in tiny:
        argv += ["--set", item]
    assert ablation.main(argv) == 0
    report = (tmp_path / "report.md").read_text()
    for arm in ablation.ARMS:
        assert f"| {arm} |" in report
        seeds = 2 if arm in ("dense", "alt") else 1
        assert len(list((tmp_path / arm).glob("seed*/eval.json"))) == seeds
    for title in ablation.STYLE_TITLES.values():
        assert f"## {title}" in report
    assert "prompt-blind" in report and "python -m recaption.ablation --out" in report
    record = json.loads((tmp_path / "results.json").read_text())
    dense = record["summary"]["paraphrase"]["dense"]
    assert dense["seeds"] == 2 and len(dense["per_seed"]) == 2
    assert dense["min"] <= dense["overall"] <= dense["max"]
    assert record["results"]["dense"]["1"]["samples_per_prompt"] == 3
    assert (tmp_path / "accuracy.png").stat().st_size and (tmp_path / "loss.png").stat().st_size
    # the paraphrases share no five-word run with what the analyzer wrote for the corpus
    captions = []
    for path in (tmp_path / "corpus" / "data").glob("*.parquet"):
        table = pq.read_table(path, columns=["caption", "caption_short", "alt_text"])
        captions += [c for col in table.columns for c in col.to_pylist() if c]
    assert len(captions) >= 80
    for p in geneval_prompts():
        for text in p.paraphrases:
            assert not shares_a_frame(text, captions), text
    # a second run resumes every stage instead of redoing it
    before = (tmp_path / "dense" / "seed0" / "eval.json").stat().st_mtime_ns
    assert ablation.main(argv) == 0
    assert (tmp_path / "dense" / "seed0" / "eval.json").stat().st_mtime_ns == before
