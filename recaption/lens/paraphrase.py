"""The `paraphrase` prompt style: every evaluation prompt in three wordings of its own.

The dense prompts are written by the analyzer's own template, so a model trained on its
captions is partly rewarded for matching a format. These wordings share no sentence frame
with the analyzer (no "A flat digital graphic showing", "There is", "medium-sized",
"background", "shape"): other clause orders, synonyms ("crimson", "disc", "upper left"),
and relative rather than absolute places ("a square to the right of a circle"). The rule is
fixed; `python -m recaption.lens.prompts` writes it out with the prompts in
`eval/prompts.jsonl`.

Each prompt gets three wordings: (1) a new frame with the plain colour and kind words,
(2) the kind named by a synonym, (3) the clauses in another order and, where the prompt
names a colour, the colour by a synonym. So a drop from wording 1 to 2 or 3 says which words the model does not know.
Two-object prompts say where the objects are relative to each other, consistent with the
layout the dense wording spells out (the first on the left, the second on the right); the
scoring still checks only what the category asks.
"""

from __future__ import annotations

COLOR_WORDS = {
    "red": "crimson",
    "blue": "azure",
    "green": "emerald",
    "orange": "tangerine",
    "purple": "violet",
    "yellow": "golden",
}
KIND_WORDS = {"circle": "disc", "square": "box", "triangle": "wedge", "star": "starburst"}
PLACE_WORDS = {
    "top left": "upper left corner",
    "top": "upper edge, halfway across",
    "top right": "upper right corner",
    "left": "left-hand side",
    "center": "middle",
    "right": "right-hand side",
    "bottom left": "lower left corner",
    "bottom": "lower edge, halfway across",
    "bottom right": "lower right corner",
}
GROUPS = {2: "a pair of", 3: "a trio of"}
NUMBER_WORDS = {2: "two", 3: "three"}


def _a(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("x", "s")) else "s")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def single_object(kind: str) -> list[str]:
    return [
        f"Just one {kind} on an empty white canvas.",
        f"{_cap(_a(KIND_WORDS[kind]))}, alone, drawn on white.",
        f"White canvas; in its middle sits a single {kind}.",
    ]


def two_object(left: str, right: str) -> list[str]:
    return [
        f"On white, {_a(left)} to the left of {_a(right)}.",
        f"{_cap(_a(KIND_WORDS[right]))} at the right-hand side with {_a(KIND_WORDS[left])} "
        "beside it.",
        f"Drawn on an empty canvas: {_a(right)} sitting to the right of {_a(left)}.",
    ]


def counting(kind: str, n: int) -> list[str]:
    return [
        f"Exactly {NUMBER_WORDS[n]} {_plural(kind)} on an empty white canvas.",
        f"{_cap(GROUPS[n])} {_plural(KIND_WORDS[kind])} and nothing else.",
        f"On a blank white canvas, {NUMBER_WORDS[n]} {_plural(kind)} in a row.",
    ]


def colors(color: str, kind: str) -> list[str]:
    return [
        f"A single {kind} coloured {color}, on white.",
        f"One {color} {KIND_WORDS[kind]} on an empty canvas.",
        f"On a blank canvas: {_a(kind)}, painted {COLOR_WORDS[color]}.",
    ]


def position(color: str, kind: str, cell: str) -> list[str]:
    place = PLACE_WORDS[cell]
    return [
        f"{_cap(_a(f'{color} {kind}'))} placed in the {place} of an empty canvas.",
        f"In the {place}: one {color} {KIND_WORDS[kind]}, on white.",
        f"Empty white canvas with {_a(f'{COLOR_WORDS[color]} {kind}')} in its {place}.",
    ]


def color_attr(left: tuple[str, str], right: tuple[str, str]) -> list[str]:
    (c1, k1), (c2, k2) = left, right
    return [
        f"On white, {_a(f'{c1} {k1}')} to the left of {_a(f'{c2} {k2}')}.",
        f"{_cap(_a(f'{c2} {KIND_WORDS[k2]}'))} at the right-hand side and "
        f"{_a(f'{c1} {KIND_WORDS[k1]}')} to its left.",
        f"Two figures on an empty canvas: the {k2} is {COLOR_WORDS[c2]}, "
        f"the {k1} is {COLOR_WORDS[c1]}.",
    ]
