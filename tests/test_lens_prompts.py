"""The evaluation's prompt styles: paraphrases that share no template with the captions, the
prompt upsampler, and how a style's images are drawn."""

from __future__ import annotations

import re

import numpy as np
import pytest

from recaption.grid import AREAS, POSITIONS
from recaption.lens.eval import generate_styles, style_texts
from recaption.lens.paraphrase import COLOR_WORDS, KIND_WORDS
from recaption.lens.prompts import CATEGORIES, Want, dense, geneval_prompts
from recaption.lens.upsample import parse, upsample

# the analyzer's fixed sentence frames (recaption/captioners/describe.py)
ANALYZER_FRAMES = (
    "a flat digital graphic",
    "a simple flat illustration",
    "there is",
    "medium-sized",
    "background",
    "shape",
    "a photo of",
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z-]+", text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def shares_a_frame(paraphrase: str, captions: list[str], n: int = 5) -> set:
    """The n-word runs a paraphrase has in common with any of the captions."""
    mine = ngrams(paraphrase, n)
    return set().union(*(mine & ngrams(c, n) for c in captions)) if captions else set()


def test_every_prompt_has_three_wordings_of_its_own():
    prompts = geneval_prompts()
    phrases = [*POSITIONS.values(), *(a for pair in AREAS.values() for a in pair)]
    templates = [p.dense for p in prompts] + [p.short for p in prompts]
    for p in prompts:
        assert len(p.paraphrases) >= 3 and len(set(p.paraphrases)) == len(p.paraphrases)
        for text in p.paraphrases:
            low = text.lower()
            assert not [f for f in ANALYZER_FRAMES if f in low], text
            assert not [ph for ph in phrases if ph in low], text  # "in the top left" etc.
            assert not shares_a_frame(text, templates), text
    # the synonyms the issue asks for are used
    every = " ".join(t for p in prompts for t in p.paraphrases).lower()
    for word in ("upper left", "crimson", "disc", "to the right of"):
        assert word in every


def test_paraphrases_still_name_what_the_prompt_wants():
    for p in geneval_prompts():
        for text in p.paraphrases:
            low = text.lower()
            for want in p.wants:
                assert want.kind in low or KIND_WORDS[want.kind] in low, text
                if want.color:
                    assert want.color in low or COLOR_WORDS[want.color] in low, text


def test_the_upsampler_writes_the_dense_style_from_the_short_prompt():
    prompts = geneval_prompts()
    assert {p.category for p in prompts} == set(CATEGORIES)
    for p in prompts:
        assert parse(p.short) == p.wants or (p.exact_count and parse(p.short) == p.wants)
        assert upsample(p.short) == p.dense
    assert upsample("a photo of a red circle") == dense([Want("circle", "red")])
    assert parse("A picture of a green star at the bottom.") == [Want("star", "green", "bottom")]
    # what it cannot read comes back as it was
    for text in ("a cat on a mat", "a photo of five circles", "a photo of a circle and"):
        assert upsample(text) == text


def test_style_texts():
    p = geneval_prompts()[0]
    assert style_texts(p, "short") == [p.short]
    assert style_texts(p, "dense") == [p.dense]
    assert style_texts(p, "upsampled") == [p.dense]
    assert style_texts(p, "paraphrase") == p.paraphrases
    with pytest.raises(ValueError, match="unknown prompt style"):
        style_texts(p, "haiku")


def test_styles_split_images_among_wordings_and_reuse_a_text(monkeypatch):
    calls = []

    # generate's stand-in: images that say which call (seed) drew them
    def fake_generate(model, encoder, texts, per_prompt, cfg_scale, steps, seed=0):
        calls.append((tuple(texts), per_prompt, seed))
        out = np.zeros((len(texts) * per_prompt, 2, 2, 3), np.uint8)
        for i in range(len(texts)):
            out[i * per_prompt : (i + 1) * per_prompt] = 10 * seed + i
        return out

    monkeypatch.setattr("recaption.lens.sample.generate", fake_generate)
    prompts = geneval_prompts()[:2]
    images = generate_styles(None, None, prompts, 8, 4.0, 2, ("dense", "upsampled", "paraphrase"))
    assert all(len(v) == 2 and v[0].shape[0] == 8 for v in images.values())
    assert np.array_equal(images["dense"][0], images["upsampled"][0])  # drawn once, reused
    # 8 images over 3 wordings: 3, 3 and 2, each wording with its own noise seed
    assert sorted((n, s) for _, n, s in calls) == [(2, 2), (3, 0), (3, 1), (8, 0)]
    for im in images["paraphrase"]:
        assert (im[:, 0, 0, 0] // 10).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
