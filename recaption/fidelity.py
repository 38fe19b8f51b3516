"""Caption fidelity: does a caption state what is in a scene, and nothing that is not?

For a corpus made from `recaption scenes`, each caption (and the web alt text, for
comparison) is read by a small phrase parser and checked against the scene's ground truth,
per attribute, as precision (what it states is true) and recall (what is true is stated):

- kind, colour: the sets of shape kinds and of shape colours mentioned ("a small red circle")
- position: "<colour> <kind> in|at|on the <cell>" against the shape of that colour and kind
- count: "one|two|three ... shapes"
- background: "<colour> background"

The parser reads only these phrases; other words are ignored, a vague caption ("abstract
art") states nothing, and a wrong one ("blue stars") states something false.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from recaption.colors import SCENE_COLORS
from recaption.corpus import DATA_DIR, CorpusStore
from recaption.grid import CELLS, SYNONYMS

ATTRIBUTES = ("kind", "color", "position", "count", "background")
FIELDS = {"captions": "caption", "caption_short": "caption_short", "alt_text": "alt_text"}

_KINDS = ("circle", "square", "triangle", "star", "oval", "rectangle", "diamond")
_COLORS = "|".join(sorted((*SCENE_COLORS, "grey"), key=len, reverse=True))
_CELL_WORDS = {**{name: name for name in CELLS.values()}, **SYNONYMS}  # word -> cell name
_CELLS = "|".join(sorted(_CELL_WORDS, key=len, reverse=True))
_MENTION = re.compile(
    rf"\b(?P<color>{_COLORS})\s+(?P<kind>{'|'.join(_KINDS)})(?:e?s)?\b"
    rf"(?:\s+(?:in|at|on)\s+the\s+(?P<cell>{_CELLS})\b)?",
    re.IGNORECASE,
)
_BACKGROUND = re.compile(rf"\b(?P<color>{_COLORS})\s+background\b", re.IGNORECASE)
_NUMBERS = {"one": 1, "a single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_COUNT = re.compile(rf"\b(?P<n>{'|'.join(_NUMBERS)})\s+(?:\w+\s+)?shapes?\b", re.IGNORECASE)


@dataclass
class Statement:
    """What one caption states about a scene."""

    shapes: set[tuple[str, str]] = field(default_factory=set)  # (colour, kind)
    positions: set[tuple[str, str, str]] = field(default_factory=set)  # (colour, kind, cell)
    count: int | None = None
    background: str | None = None


def _color(word: str) -> str:
    word = word.lower()
    return "gray" if word == "grey" else word


def parse(text: str | None) -> Statement:
    out = Statement()
    text = text or ""
    for m in _MENTION.finditer(text):
        shape = (_color(m["color"]), m["kind"].lower())
        out.shapes.add(shape)
        if m["cell"]:
            out.positions.add((*shape, _CELL_WORDS[m["cell"].lower()]))
    if m := _BACKGROUND.search(text):
        out.background = _color(m["color"])
    if m := _COUNT.search(text):
        out.count = _NUMBERS[m["n"].lower()]
    return out


@dataclass
class Tally:
    """Micro-averaged counts per attribute: true statements, statements, truths stated."""

    stated: Counter = field(default_factory=Counter)
    correct: Counter = field(default_factory=Counter)  # statements that are true
    truths: Counter = field(default_factory=Counter)
    found: Counter = field(default_factory=Counter)  # truths that were stated

    def add(self, said: Statement, truth: dict) -> None:
        shapes = truth["shapes"]
        kinds = {s["kind"] for s in shapes}
        colors = {s["color"] for s in shapes}
        cells = {(s["color"], s["kind"], s["cell"]) for s in shapes}
        self._score("kind", {k for _, k in said.shapes}, kinds)
        self._score("color", {c for c, _ in said.shapes}, colors)
        self._score("position", said.positions, cells)
        self._score("count", {said.count} - {None}, {truth["count"]})
        self._score("background", {said.background} - {None}, {truth["background"]})

    def _score(self, attribute: str, said: set, true: set) -> None:
        self.stated[attribute] += len(said)
        self.correct[attribute] += len(said & true)
        self.truths[attribute] += len(true)
        self.found[attribute] += len(true & said)

    def result(self) -> dict[str, dict[str, float | None]]:
        return {
            a: {
                "recall": self.found[a] / self.truths[a] if self.truths[a] else None,
                "precision": self.correct[a] / self.stated[a] if self.stated[a] else None,
            }
            for a in ATTRIBUTES
        }


def load_truth(scenes: Path) -> dict[str, dict]:
    path = scenes / "truth.jsonl" if scenes.is_dir() else scenes
    if not path.is_file():
        raise FileNotFoundError(f"no ground truth at {path} (made by `recaption scenes`)")
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def evaluate(corpus: Path, scenes: Path) -> dict:
    """Fidelity of each caption field and of the alt text, over the captioned scenes."""
    truth = load_truth(scenes)
    store = CorpusStore(corpus)
    files = list(store.shard_files(DATA_DIR).values())
    if not files:
        raise FileNotFoundError(f"no corpus shards in {corpus / DATA_DIR}")
    tallies = {name: Tally() for name in FIELDS}
    matched = 0
    for path in files:
        table = pq.read_table(path, columns=["key", *FIELDS.values()], filesystem=store.arrow_fs)
        for row in table.to_pylist():
            if (scene := truth.get(row["key"])) is None:
                continue
            matched += 1
            for name, column in FIELDS.items():
                tallies[name].add(parse(row[column]), scene)
    if not matched:
        raise ValueError(f"no key of {corpus} is in the ground truth of {scenes}")
    return {
        **{name: t.result() for name, t in tallies.items()},
        "scenes": len(truth),
        "captioned": matched,
    }


def table(result: dict) -> str:
    """The result as a Markdown table: precision / recall per attribute and source."""

    def cell(v: dict) -> str:
        return " / ".join("–" if x is None else f"{x:.1%}" for x in (v["precision"], v["recall"]))

    lines = [
        "| attribute | " + " | ".join(f"{n} (precision / recall)" for n in FIELDS) + " |",
        "| --- |" + " --- |" * len(FIELDS),
    ]
    for a in ATTRIBUTES:
        lines.append(f"| {a} | " + " | ".join(cell(result[n][a]) for n in FIELDS) + " |")
    return "\n".join(lines)
