"""The run folder, `runs/NAME/`: what a training run leaves behind and resumes from.

```
config.json              the LensConfig, the corpus, the text encoder, the caption mix
checkpoints/step-N.pt    model, EMA, optimiser, RNG and data-stream position (the last few)
metrics.jsonl            one line per `log_every` steps: loss, lr, steps/s, samples/s, ...
loss.png                 the loss curve
samples/step-N.png       grids for the fixed prompts (`sample.prompts`), one row per prompt
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from recaption.config import ConfigError
from recaption.lens.config import LensConfig

# keys that may change between a run and its resumption: they do not change what is learnt
RESUMABLE_CHANGES = {
    "steps",
    "minutes",
    "sample",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.metrics = self.path / "metrics.jsonl"

    # -- config -------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "config.json").read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not a Lens run (no config.json)") from None

    def check_resumable(self, cfg: LensConfig, corpus: str) -> None:
        """A run folder resumes only the same training: same corpus and same settings."""
        old = self.read_config()
        # through the model: keys added since the run was written read as their defaults
        before = type(cfg).model_validate(old["config"]).model_dump(mode="json")
        new = cfg.model_dump(mode="json")
        changed = [k for k in new if k not in RESUMABLE_CHANGES and before[k] != new[k]]
        if old.get("corpus") != corpus:
            changed.insert(0, "corpus")
        if changed:
            raise ConfigError(
                f"{self.path} holds a run with other settings ({', '.join(changed)} differ); "
                "resume it with the same ones, or train into another --out"
            )

    def write_config(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "config.json", json.dumps(record, indent=2).encode())

    # -- checkpoints --------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step-*.pt"))
        return found[-1] if found else None

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        path = self.checkpoints / f"step-{step:07d}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # a kill leaves the previous checkpoint, never a torn one
        for old in sorted(self.checkpoints.glob("step-*.pt"))[:-keep]:
            old.unlink()
        return path

    # -- metrics ------------------------------------------------------------------------------

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill ends the file
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop what a killed run logged after its last checkpoint: the resumed run redoes it."""
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        _atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def plot_loss(self) -> Path | None:
        rows = self.read_metrics()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, [r["loss"] for r in rows], lw=0.8, alpha=0.5, label="loss")
        window = max(1, len(rows) // 20)
        smooth = np.convolve([r["loss"] for r in rows], np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.6, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.path / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        return path


def save_grid(images: np.ndarray, columns: int, path: Path, scale: int = 2) -> Path:
    """uint8 [N, H, W, 3] -> one PNG, `columns` images a row, each enlarged `scale` times."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    pad = 2
    grid = Image.new("RGB", (columns * (w * scale + pad) + pad, rows * (h * scale + pad) + pad))
    for i, image in enumerate(images):
        tile = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        r, c = divmod(i, columns)
        grid.paste(tile, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
