"""The prompt upsampler: a user's short prompt rewritten into the dense-caption style.

DALL-E 3 and Lens train on long captions and so expand a user's short prompt with a
language model before sampling; a model trained only on dense captions otherwise meets a
sentence unlike anything it saw. Here the expansion is a rule, not a model: it reads a
GenEval-style prompt ("a photo of a red circle", "a photo of two stars", "a photo of a
blue square in the top left", "a photo of a circle and a star"), and writes the scene it
asks for in the analyzer's words, filling in what the prompt leaves open (a place for each
object, a colour training showed with the kind) as an upsampler does. A prompt it cannot
read comes back unchanged, so it is safe on any text.
"""

from __future__ import annotations

import re

from recaption.grid import PLACES
from recaption.lens.prompts import NUMBERS, Want, dense
from recaption.scenes import KINDS

COLORS = ("red", "blue", "green", "orange", "purple", "yellow", "black", "white", "gray")
_KIND = "|".join(KINDS)
_COLOR = "|".join(COLORS)
_OBJECT = re.compile(rf"^(?:an?|one) (?:({_COLOR}) )?({_KIND})$")
_COUNT = re.compile(rf"^({'|'.join(NUMBERS.values())}) ({_KIND})s$")
_PLACE = {phrase: name for name, phrase in PLACES.items()}


def parse(prompt: str) -> list[Want] | None:
    """The objects a GenEval-style prompt asks for, or None when it is not one."""
    text = prompt.strip().rstrip(".").lower()
    text = re.sub(r"^(?:a photo|an image|a picture) of ", "", text)
    cell = None
    for phrase, name in _PLACE.items():
        if text.endswith(" " + phrase):
            text, cell = text[: -len(phrase) - 1], name
            break
    if m := _COUNT.match(text):
        n = next(k for k, word in NUMBERS.items() if word == m[1])
        return None if cell else [Want(m[2])] * n
    wants = []
    for part in text.split(" and "):
        if not (m := _OBJECT.match(part)):
            return None
        wants.append(Want(m[2], m[1]))
    if cell is not None:
        if len(wants) != 1:
            return None
        wants = [Want(wants[0].kind, wants[0].color, cell)]
    return wants if 1 <= len(wants) <= 3 else None


def upsample(prompt: str) -> str:
    """The dense-style wording of a short prompt; the prompt itself if it cannot be read."""
    wants = parse(prompt)
    return prompt if wants is None else dense(wants)
