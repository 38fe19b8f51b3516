"""Does the caption decide where a shape goes, or does the starting noise?

    python docs/ablation/layout.py RUN [RUN ...]

At the noisy end of the path a sample's layout is decided. There the model's estimate of the
clean image, x0 = x_t - t * v, should put the shape in the cell the prompt names. For each of
the evaluation's six position prompts (dense style, one shape, six different cells), this
takes 64 starting noises over a white background at t = 1, 0.95 and 0.8, averages each
prompt's |x0 - its median| over the noises, keeps only what is specific to the prompt (minus
the mean over the six prompts, negatives dropped: the background patterns every prompt
shares cancel), and reports the share of that mass that falls in the prompt's cell of the 3x3
grid. 1/9 = 0.11: the caption does not place the shape, the noise does; 1: it alone does.
The EMA weights of each RUN; prints one line per run and t.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from recaption.grid import CELL_INDEX
from recaption.lens.prompts import geneval_prompts
from recaption.lens.sample import load_run


def cell_shares(
    run: str, ts: tuple[float, ...] = (1.0, 0.95, 0.8), n: int = 64
) -> dict[float, list[float]]:
    """t -> each position prompt's share of its own mass in its cell."""
    loaded = load_run(run, "cpu")
    size = loaded.cfg.model.image_size
    prompts = [p for p in geneval_prompts() if p.category == "position"]
    texts = [loaded.encoder([p.dense] * n) for p in prompts]  # encoded once, used at every t
    noise = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    edges = np.linspace(0, size, 4).round().astype(int)
    out = {}
    for t in ts:
        x_t = t * noise + (1 - t)  # a white background (1.0) with no shape, then noised
        means = []
        for text in texts:
            with torch.no_grad():
                v = loaded.model(x_t, torch.full((n,), t), text.tokens, text.mask)
            x0 = x_t - t * v
            median = x0.flatten(2).median(-1).values[..., None, None]
            means.append((x0 - median).abs().mean(1).mean(0))
        shared = torch.stack(means).mean(0)
        shares = []
        for prompt, mean in zip(prompts, means, strict=True):
            own = (mean - shared).clamp(min=0)
            cells = torch.tensor(
                [[own[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].sum() for c in range(3)]
                 for r in range(3)]
            )  # fmt: skip
            row, col = CELL_INDEX[prompt.wants[0].cell]
            shares.append(float(cells[row, col] / cells.sum().clamp(min=1e-12)))
        out[t] = shares
    return out


def main(runs: list[str]) -> None:
    for run in runs:
        for t, shares in cell_shares(run).items():
            print(
                f"{run} t={t:.2f}: {np.mean(shares):.2f} of the prompt's own mass in its cell "
                f"(per prompt {' '.join(f'{s:.2f}' for s in shares)}; 0.11 = placed by noise)"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
