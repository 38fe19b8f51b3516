"""Held-out prompts for `recaption lens eval`, GenEval's six categories on the scene world.

Every prompt carries what an image must show to pass, and comes in three styles: GenEval's
short style ("a photo of a red triangle"), the same prompt rewritten by a fixed template
into the analyzer's dense-caption style (what the upsampler in `upsample.py` writes, as
DALL-E 3 and Lens upsample prompts at inference), and three paraphrases that share no
template with the analyzer (`paraphrase.py`).
Colours go with kinds only in pairs that `recaption scenes` never draws (`HELD_OUT`), so a
model passes them only by composing a colour and a kind it saw apart.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recaption.grid import PLACES
from recaption.lens import paraphrase as para
from recaption.scenes import HELD_OUT, KINDS

_FILL_COLORS = ("red", "blue", "green", "orange", "purple", "yellow")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {1: "one", 2: "two", 3: "three"}
# where the dense template puts n objects whose place the prompt does not say
_LAYOUT = {1: ["center"], 2: ["left", "right"], 3: ["left", "center", "right"]}


@dataclass(frozen=True)
class Want:
    kind: str
    color: str | None = None
    cell: str | None = None


@dataclass
class Prompt:
    category: str
    short: str
    dense: str
    wants: list[Want]
    exact_count: int | None = None  # counting: exactly this many of the kind
    tags: dict = field(default_factory=dict)
    # wordings that share no template with the analyzer's captions (`paraphrase.py`)
    paraphrases: list[str] = field(default_factory=list)

    def text(self, style: str) -> str:
        return self.dense if style == "dense" else self.short


def _a(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def layout(wants: list[Want]) -> list[tuple[str, str, str]]:
    """(colour, kind, cell) of each wanted object in the scene the dense wording describes.
    Like an upsampler, it fills in what a short prompt leaves open: a place, and a colour
    that training showed with the kind. The evaluation still checks only what was asked."""
    free = iter(_FILL_COLORS)
    return [
        (
            want.color or next(c for c in free if (c, want.kind) not in HELD_OUT),
            want.kind,
            want.cell or cell,
        )
        for want, cell in zip(wants, _LAYOUT[len(wants)], strict=True)
    ]


def dense(wants: list[Want]) -> str:
    """The analyzer's dense-caption wording of a scene that shows `wants`."""
    parts = [f"{_a(f'medium-sized {c} {k}')} {PLACES[cell]}" for c, k, cell in layout(wants)]
    there = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"
    shapes = "shape" if len(wants) == 1 else "shapes"
    return (
        f"A flat digital graphic showing {NUMBERS[len(wants)]} {shapes} on a plain white "
        f"background. There is {there}."
    )


def _prompt(category: str, short: str, wants: list[Want], paraphrases: list[str], **kw) -> Prompt:
    return Prompt(category, short, dense(wants), wants, paraphrases=paraphrases, **kw)


def geneval_prompts() -> list[Prompt]:
    out = []
    for kind in KINDS:
        short = f"a photo of {_a(kind)}"
        out.append(_prompt("single_object", short, [Want(kind)], para.single_object(kind)))
    for k1, k2 in itertools.combinations(KINDS, 2):
        # the dense layout puts the first object on the left: the paraphrase says so too
        wants = [Want(k1), Want(k2)]
        short = f"a photo of {_a(k1)} and {_a(k2)}"
        out.append(_prompt("two_object", short, wants, para.two_object(k1, k2)))
    for kind, n in itertools.product(KINDS, (2, 3)):
        short = f"a photo of {NUMBERS[n]} {kind}s"
        out.append(
            _prompt("counting", short, [Want(kind)] * n, para.counting(kind, n), exact_count=n)
        )
    return out + pair_prompts(sorted(HELD_OUT))


def pair_prompts(pairs: list[tuple[str, str]]) -> list[Prompt]:
    """The colours, position and colour-binding prompts, over six (colour, kind) pairs: the
    evaluation's are the held-out ones; `docs/ablation/seen_pairs.py` asks for seen ones."""
    out = []
    for color, kind in pairs:
        short = f"a photo of {_a(f'{color} {kind}')}"
        out.append(_prompt("colors", short, [Want(kind, color)], para.colors(color, kind)))
    for (color, kind), cell in zip(
        pairs, ("top left", "bottom right", "top", "right", "bottom left", "left"), strict=True
    ):
        short = f"a photo of {_a(f'{color} {kind}')} {PLACES[cell]}"
        wants = [Want(kind, color, cell)]
        out.append(_prompt("position", short, wants, para.position(color, kind, cell)))
    for (c1, k1), (c2, k2) in zip(pairs, pairs[1:] + pairs[:1], strict=True):
        short = f"a photo of {_a(f'{c1} {k1}')} and {_a(f'{c2} {k2}')}"
        wants = [Want(k1, c1), Want(k2, c2)]
        out.append(_prompt("color_attr", short, wants, para.color_attr((c1, k1), (c2, k2))))
    return out


def write_prompts(path: Path, prompts: list[Prompt]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(p)) + "\n" for p in prompts))


def read_prompts(path: Path) -> list[Prompt]:
    prompts = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["wants"] = [Want(**w) for w in record["wants"]]
            prompts.append(Prompt(**record))
    return prompts


if __name__ == "__main__":  # python -m recaption.lens.prompts eval/prompts.jsonl
    import sys

    write_prompts(
        Path(sys.argv[1] if len(sys.argv) > 1 else "eval/prompts.jsonl"), geneval_prompts()
    )
