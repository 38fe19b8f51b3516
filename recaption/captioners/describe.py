"""The analyzer's prose: an `Analysis` in, a caption record out.

Every sentence states a measurement, and a negative ("no faces") only for what was checked:
where faces or text were not looked for, the caption says nothing about them.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np

from recaption.captioners.measure import Analysis, Region
from recaption.grid import AREAS, position_phrase
from recaption.records import Caption


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _count(n: int, noun: str) -> str:
    words = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return f"{words[n] if n < len(words) else n} {noun}{'' if n == 1 else 's'}"


def _light(a: Analysis) -> str:
    level = (
        "very dark"
        if a.brightness < 25
        else "dark"
        if a.brightness < 42
        else "moderately bright"
        if a.brightness < 68
        else "bright"
    )
    contrast = "low" if a.contrast < 12 else "moderate" if a.contrast < 24 else "high"
    if a.chroma < 4:
        tone = "with little colour overall"
    elif a.chroma < 15:
        tone = "with muted colours"
    else:
        tone = "with saturated colours"
    warmth = (
        ""
        if a.chroma < 8 or abs(a.warmth) < 6
        else (" in warm tones" if a.warmth > 0 else " in cool tones")
    )
    return f"The image is {level} with {contrast} contrast, {tone}{warmth}."


def _palette(a: Analysis) -> str:
    parts = [f"{name} ({round(share * 100)}%)" for name, share in a.palette[:5]]
    if not parts:
        return "No single colour covers much of the frame; the palette is fragmented."
    if len(parts) == 1:
        return f"The palette is almost entirely {parts[0]}."
    return f"The palette is dominated by {parts[0]}, followed by {_join(parts[1:])}."


def _layout(a: Analysis) -> str:
    d = a.detail
    if d.max() < 1e-6:
        return "The frame is uniform, with no detail anywhere."
    busiest = np.unravel_index(int(d.argmax()), d.shape)
    calmest = np.unravel_index(int(d.argmin()), d.shape)
    sentence = f"Most of the fine detail is concentrated {AREAS[busiest][0]}"
    if d.min() < 0.5 * d.max():
        sentence += f", while {AREAS[calmest][1]} is comparatively smooth"
    sentence += "."
    if abs(a.top_bottom) > 12:
        upper, lower = ("brighter", "darker") if a.top_bottom > 0 else ("darker", "brighter")
        sentence += f" The upper part of the frame is {upper} and the lower part {lower}."
    return sentence


def _region_phrase(r: Region) -> str:
    return f"{_article(f'{r.size} {r.name}')} {r.position}"


def _relation(a: Region, b: Region) -> str | None:
    horizontal = (
        "to the left of" if a.cx < b.cx - 0.15 else "to the right of" if a.cx > b.cx + 0.15 else ""
    )
    vertical = "above" if a.cy < b.cy - 0.15 else "below" if a.cy > b.cy + 0.15 else ""
    where = " and ".join(p for p in (vertical, horizontal) if p)
    return f"the {a.color} {a.kind} is {where} the {b.color} {b.kind}" if where else None


def _format(a: Analysis) -> str:
    shape = (
        "square"
        if 0.95 < a.width / a.height < 1.05
        else "landscape"
        if a.width > a.height
        else "portrait"
    )
    return f"The frame is {shape}, {a.width} by {a.height} pixels."


def _faces_and_text(a: Analysis) -> list[str]:
    """What was found, or, when nothing was, that nothing was: only for what was checked."""
    out = []
    if a.faces:
        where = _join(sorted({position_phrase(x, y) for x, y in a.faces}))
        out.append(
            f"{_count(len(a.faces), 'face').capitalize()} {'is' if len(a.faces) == 1 else 'are'} visible {where}."
        )
    if a.text:
        quoted = _join([f'"{t}"' for t in a.text[:4]])
        out.append(f"Legible text reads {quoted}.")
    if not a.faces and not a.text:
        if a.faces_checked and a.text_checked:
            out.append("No faces or legible text are visible.")
        elif a.faces_checked:
            out.append("No faces are visible.")
        elif a.text_checked:
            out.append("No legible text is visible.")
    return out


def describe(a: Analysis, seed: str = "") -> Caption:
    """Turn measurements into the caption record; every sentence states a measurement."""
    variant = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) if seed else 0
    shapes = a.shapes[:6]
    style = a.style
    if style == "flat graphic" and shapes:
        kinds = _join([_article(f"{s.color} {s.kind}") for s in shapes])
        ground = f"{'patterned' if a.patterned else 'plain'} {a.background} background"
        opening = (
            f"A flat digital graphic showing {_count(len(shapes), 'shape')} on a {ground}.",
            f"A simple flat illustration of {_count(len(shapes), 'geometric shape')} against a {ground}.",
        )[variant % 2]
        sentences = [opening, f"There is {_join([_region_phrase(s) for s in shapes])}."]
        relations = [r for r in (_relation(x, y) for x, y in itertools.pairwise(shapes)) if r]
        if relations:
            sentences.append(_join(relations).capitalize() + ".")
        short = f"{kinds[0].upper()}{kinds[1:]} on a {a.background} background."
        objects = [s.name for s in shapes]
    else:
        main = [name for name, _ in a.palette[:2]]
        noun = _article(style)
        noun = noun[0].upper() + noun[1:]  # "A photograph", "An image"
        opening = (
            f"{noun} whose colours are mostly {_join(main) or 'mixed'}.",
            f"{noun} dominated by {_join(main) or 'mixed colours'}.",
        )[variant % 2]
        sentences = [opening]
        large = [r for r in a.regions if r.share >= 0.04][:3]
        if large:
            sentences.append(f"Distinct areas include {_join([_region_phrase(r) for r in large])}.")
        extras = []
        if a.faces:
            extras.append(_count(len(a.faces), "face"))
        if a.text:
            extras.append("legible text")
        short = f"{noun} dominated by {_join(main) or 'mixed colours'}" + (
            f", with {_join(extras)}." if extras else "."
        )
        objects = []
    if a.faces:
        objects.append("face" if len(a.faces) == 1 else _count(len(a.faces), "face"))
    if a.text:
        objects.append("text")

    sentences += _faces_and_text(a)
    sentences += [_palette(a), _light(a), _layout(a)]
    if a.patterned:
        sentences.append(
            f"The background is patterned in a slightly different shade of {a.background}."
        )
    elif style == "flat graphic":
        sentences.append("The colours are flat and even, without texture, shading or gradients.")
    if len(" ".join(sentences).split()) < 60 and a.tones[0] != a.tones[1]:
        sentences.append(
            f"Its tones run from {a.tones[0]} in the darkest parts to {a.tones[1]} in the brightest."
        )
    sentences.append(_format(a))
    # Keep the dense caption within 60-150 words: drop from the end, which holds the least.
    while len(" ".join(sentences).split()) > 150 and len(sentences) > 3:
        sentences.pop(-2)
    return Caption(
        caption=" ".join(sentences),
        caption_short=short,
        objects=objects,
        visible_text=list(a.text),
        style=style,
    )
