import pytest

from recaption.config import ValidationConfig
from recaption.records import Caption, Reason
from recaption.validation import CaptionInvalid, validate_caption

RULES = ValidationConfig(min_words=20, max_words=80)
GOOD = (
    "A red circle sits in the top left of a plain white background, with a small blue square "
    "near the centre and a green triangle at the bottom right. The colours are flat and the light is even."
)


def cap(caption=GOOD, short="Three shapes on white.") -> Caption:
    return Caption(
        caption=caption,
        caption_short=short,
        objects=["red circle"],
        visible_text=[],
        style="graphic",
    )


def test_good_caption_passes_unchanged():
    assert validate_caption(cap(), RULES).caption == GOOD


@pytest.mark.parametrize(
    "prefix",
    ["The image shows ", "This picture depicts ", "Caption: ", "Sure! Here is a description: "],
)
def test_boilerplate_prefix_is_stripped(prefix):
    out = validate_caption(cap(prefix + GOOD[0].lower() + GOOD[1:]), RULES)
    assert out.caption == GOOD


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("", Reason.empty),
        ("I'm sorry, but I can't help with identifying people in this image. " * 3, Reason.refusal),
        ("A red circle on white.", Reason.too_short),
        (GOOD + " " + GOOD + " " + GOOD, Reason.too_long),
        ("A red circle " * 12 + "and more.", Reason.repetition),
        (GOOD[:-1] + " and then the", Reason.truncated_output),
        (
            "Un cercle rouge se trouve en haut à gauche sur un fond blanc uni, avec un petit carré bleu "
            "près du milieu et un triangle vert en bas à droite. Les couleurs sont plates et douces.",
            Reason.wrong_language,
        ),
    ],
)
def test_bad_captions_are_rejected(caption, reason):
    with pytest.raises(CaptionInvalid) as info:
        validate_caption(cap(caption), RULES)
    assert info.value.reason == reason


def test_language_check_can_be_disabled():
    french = "Un cercle rouge se trouve en haut à gauche sur un fond blanc uni, avec un petit carré bleu près du milieu et un triangle vert en bas."
    assert validate_caption(cap(french), RULES.model_copy(update={"language": None}))
