"""Held-out colour-kind pairs against seen ones: is composition what holds a run back?

    python docs/ablation/seen_pairs.py RUN [N]

The evaluation's colours, position and colour-binding prompts ask only for colour-kind pairs
that `recaption scenes` never draws (`HELD_OUT`). This scores a trained run (its EMA weights)
on those 18 prompts and on the same 18 with each held-out pair replaced by a seen pair of the
same colour (the next kind the scenes do draw in it), both worded by the evaluation's own
`pair_prompts`, in the dense style, N images a prompt (default 8), CFG 4, 20 Euler steps.
Equal scores mean the held-out pairs are not the obstacle: the run would fail the seen pairs
as often. Writes RUN/seen-vs-held.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recaption.lens.eval import generate_styles, score
from recaption.lens.prompts import pair_prompts
from recaption.lens.sample import load_run
from recaption.scenes import HELD_OUT, KINDS


def seen_counterparts(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each held-out (colour, kind) with its kind moved on to one the scenes draw in that
    colour, no pair twice."""
    out: list[tuple[str, str]] = []
    for color, kind in pairs:
        start = KINDS.index(kind)
        for step in range(1, len(KINDS)):
            pair = (color, KINDS[(start + step) % len(KINDS)])
            if pair not in HELD_OUT and pair not in out:
                out.append(pair)
                break
    return out


def main(run: str, n: int = 8) -> None:
    loaded = load_run(run, "cpu", None)
    held = sorted(HELD_OUT)
    result = {}
    for name, pairs in (("held_out", held), ("seen", seen_counterparts(held))):
        prompts = pair_prompts(pairs)
        images = generate_styles(loaded.model, loaded.encoder, prompts, n, 4.0, 20, ("dense",))
        result[name] = {"pairs": pairs, **score(prompts, images)["dense"]}
        print(name, pairs, result[name]["categories"])
    result |= {"run": run, "step": loaded.step, "samples_per_prompt": n}
    (Path(run) / "seen-vs-held.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
