"""`recaption lens sample`: load a run's EMA weights and draw images for prompts (Euler, CFG)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from recaption.config import ConfigError
from recaption.lens.config import LensConfig
from recaption.lens.flow import euler_sample, guided
from recaption.lens.model import MMDiT
from recaption.lens.run import RunDir, save_grid
from recaption.lens.text import TextEncoder


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


@torch.no_grad()
def generate(
    model: MMDiT,
    encoder: TextEncoder,
    prompts: list[str],
    per_prompt: int,
    cfg_scale: float,
    steps: int,
    seed: int = 0,
    batch: int = 128,
) -> np.ndarray:
    """uint8 [len(prompts) * per_prompt, H, W, 3], prompt-major; the same seed gives the
    same starting noise for every prompt, so a grid compares prompts on equal footing.
    Prompts are sampled together, `batch` images at a time."""
    device = next(model.parameters()).device
    size = model.cfg.image_size
    noise = torch.randn(
        (per_prompt, model.channels, size, size), generator=torch.Generator().manual_seed(seed)
    ).repeat(len(prompts), 1, 1, 1)
    texts = [p for p in prompts for _ in range(per_prompt)]
    empty = encoder([""])
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch):
        text = encoder(texts[start : start + batch])
        velocity = guided(model, text.tokens, text.mask, empty.tokens, empty.mask, cfg_scale)
        out.append(to_uint8(euler_sample(velocity, noise[start : start + batch].to(device), steps)))
    model.train(was_training)
    return np.concatenate(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] pixels [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class LoadedRun:
    cfg: LensConfig
    model: MMDiT  # the EMA weights
    encoder: TextEncoder
    step: int


def load_run(path: str | Path, device: str = "auto", cache_dir: Path | None = None) -> LoadedRun:
    run = RunDir(path)
    cfg = LensConfig.model_validate(run.read_config()["config"])
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise ConfigError(f"{run.path} has no checkpoint yet")
    dev = pick_device(device)
    encoder = TextEncoder(cfg.text, cache_dir, dev)
    model = MMDiT(cfg.model, encoder.dim, text_layers=len(cfg.text.layers)).to(dev)
    state = torch.load(checkpoint, map_location=dev, weights_only=True)
    model.load_state_dict(state["ema"])
    return LoadedRun(cfg, model.eval(), encoder, state["step"])


def sample_to_files(
    run_path: str | Path,
    prompts: list[str],
    out: Path,
    n: int,
    cfg_scale: float,
    steps: int,
    seed: int,
    device: str = "auto",
    cache_dir: Path | None = None,
) -> list[Path]:
    """One PNG per image (`NN-slug-K.png`) and `grid.png` with a row per prompt."""
    loaded = load_run(run_path, device, cache_dir)
    images = generate(loaded.model, loaded.encoder, prompts, n, cfg_scale, steps, seed)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "empty"
        for k in range(n):
            path = out / f"{i:02d}-{slug}-{k}.png"
            Image.fromarray(images[i * n + k]).save(path)
            written.append(path)
    written.append(save_grid(images, n, out / "grid.png", scale=4))
    return written
