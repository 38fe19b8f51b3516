"""The detector against a person, on images the trainer generated.

    python docs/ablation/detector_check.py [--list]

`eval/detector/seedK.png` holds the 288 images `recaption lens eval --n 8 --styles dense`
drew from the 10-minute bench's `after` checkpoint of seed K (CFG 4, 20 Euler steps), a row
a prompt; `seedK.labels` says, image by image, whether a person sees in it what the prompt
asks. Prints, per seed, how often the detector and the person agree, and both accuracies per
category; `--list` prints the images they read differently, with what the detector found.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recaption.lens.detect import detect
from recaption.lens.eval import passes, person_agreement, read_labelled
from recaption.lens.prompts import CATEGORIES, geneval_prompts

DATA = Path(__file__).resolve().parents[2] / "eval" / "detector"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the disagreements")
    args = parser.parse_args()
    prompts = geneval_prompts()
    for png in sorted(DATA.glob("seed*.png")):
        images, rows = read_labelled(png, png.with_suffix(".labels"))
        result = person_agreement(prompts, images, rows)
        print(f"{png.stem}: detector and person agree on {result['agreement']:.1%} of "
              f"{result['images']} images")  # fmt: skip
        print("  " + " ".join(f"{c:>13s}" for c in ("", *CATEGORIES)))
        for who in ("detector", "person"):
            cells = " ".join(f"{result[who][c]:13.2f}" for c in CATEGORIES)
            print(f"  {who:>13s} {cells}")
        if args.list:
            for i, (prompt, batch, row) in enumerate(zip(prompts, images, rows, strict=True)):
                for k, (image, label) in enumerate(zip(batch, row, strict=True)):
                    found = detect(image)
                    if label != "?" and passes(prompt, found) != (label == "1"):
                        shapes = " + ".join(
                            f"{s.color} {s.kind or 'blob'} @ {s.cell}" for s in found.shapes
                        )
                        print(f"    {i:2d}.{k} {prompt.short!r}: person {label}, "
                              f"detector {shapes or '-'}")  # fmt: skip


if __name__ == "__main__":
    main()
