"""Quality rules on top of the Caption schema: what a trainer must not see.

`validate_caption` returns the cleaned caption (boilerplate prefixes stripped) or raises
`CaptionInvalid` with a rejection reason.
"""

from __future__ import annotations

import re
from collections import Counter

from recaption.config import ValidationConfig
from recaption.errors import Rejected
from recaption.records import Caption, Reason, Stage


class CaptionInvalid(Rejected):
    stage = Stage.validate


REFUSALS = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, |i can'?not|i can'?t|i'?m unable|i am unable|i'?m not able|"
    r"as an ai|unfortunately, i|i do not feel comfortable|i won'?t be able)",
    re.IGNORECASE,
)
# "The image shows ...", "Caption: ...", "Sure! Here is a description: ..." add nothing.
BOILERPLATE = re.compile(
    r"^\s*(sure[,!.]?\s*)?(here(?:'s| is) (?:a |the )?(?:dense |detailed )?(?:caption|description)"
    r"(?: of (?:the|this) image)?\s*[:.-]\s*|caption\s*:\s*|description\s*:\s*|"
    r"(?:the|this) (?:image|picture|photo|photograph) (?:shows|depicts|features|displays|captures)\s+|"
    r"in (?:the|this) (?:image|picture|photo),?\s+)",
    re.IGNORECASE,
)
# A handful of the commonest English function words: a dense caption always has some.
_ENGLISH = frozenset(
    (
        "a an the of and in on with at to is are its it this that by from as for near above "
        "below behind left right top bottom center centre which while"
    ).split()
)


def strip_boilerplate(text: str) -> str:
    text = text.strip()
    stripped = BOILERPLATE.sub("", text, count=1).strip()
    if stripped and stripped != text:
        return stripped[0].upper() + stripped[1:]
    return text


def _repeated_share(words: list[str], n: int = 3) -> float:
    """Share of word n-grams that are repeats: degenerate loops push it towards 1."""
    count = len(words) - n + 1
    if count <= 0:
        return 0.0
    return 1 - len(set(zip(*(words[i:] for i in range(n)), strict=False))) / count


def validate_caption(caption: Caption, rules: ValidationConfig) -> Caption:
    dense = strip_boilerplate(caption.caption)
    short = strip_boilerplate(caption.caption_short)
    if not dense or not short:
        raise CaptionInvalid(Reason.empty, "caption or caption_short is empty")
    for text in (dense, short):
        if REFUSALS.match(text):
            raise CaptionInvalid(Reason.refusal, text[:120])
    words = dense.split()
    if len(words) < rules.min_words:
        raise CaptionInvalid(
            Reason.too_short, f"{len(words)} words < validation.min_words={rules.min_words}"
        )
    if len(words) > rules.max_words:
        raise CaptionInvalid(
            Reason.too_long, f"{len(words)} words > validation.max_words={rules.max_words}"
        )
    if len(short.split()) > rules.short_max_words:
        raise CaptionInvalid(
            Reason.too_long,
            f"caption_short has {len(short.split())} words > {rules.short_max_words}",
        )
    lowered = dense.lower().split()
    share = _repeated_share(lowered)
    counts = Counter(lowered)
    top_word, top_count = counts.most_common(1)[0]
    if share > rules.max_repeated_ngram_share or (
        top_count > max(8, len(words) // 4) and top_word not in _ENGLISH
    ):
        raise CaptionInvalid(Reason.repetition, f"{share:.0%} of word trigrams repeat")
    if not dense.rstrip().endswith((".", "!", "?", '"', "”", ")")):
        raise CaptionInvalid(
            Reason.truncated_output, f"caption ends mid-sentence: ...{dense[-40:]!r}"
        )
    if rules.language == "en":
        # function words seldom carry punctuation: the word counts above will do
        english = sum(counts[w] for w in _ENGLISH if w in counts) / len(lowered)
        if english < 0.08:
            raise CaptionInvalid(Reason.wrong_language, f"only {english:.0%} common English words")
    if dense == caption.caption and short == caption.caption_short:
        return caption  # nothing stripped: most captions
    return caption.model_copy(update={"caption": dense, "caption_short": short})
