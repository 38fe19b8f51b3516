"""LensConfig: the trainer's settings. Named presets (`tiny`, `small`) plus `--set` overrides.

`tiny` trains on two CPU cores in minutes; `small` is sized for one GPU and an hour.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any, Literal

from pydantic import Field, model_validator

from recaption.config import ConfigError, Strict, with_overrides

CaptionSource = Literal["dense", "short", "alt"]
# corpus column each caption source reads
SOURCE_COLUMNS: dict[str, str] = {"dense": "caption", "short": "caption_short", "alt": "alt_text"}


# the fixed prompts of the sample grids: scenes, worded the way dense captions word them
SAMPLE_PROMPTS = (
    "A flat digital graphic showing one shape on a plain white background. "
    "There is a medium-sized red circle in the top left.",
    "A flat digital graphic showing one shape on a plain black background. "
    "There is a medium-sized yellow star in the center.",
    "A flat digital graphic showing two shapes on a plain white background. "
    "There is a medium-sized blue square in the top left and a medium-sized green triangle "
    "in the bottom right.",
    "A flat digital graphic showing three shapes on a plain gray background. "
    "There is a small orange circle at the top, a small purple square on the left "
    "and a small cyan triangle at the bottom.",
)


class ModelConfig(Strict):
    image_size: int = Field(32, ge=8, description="pixels per side (the whole frame, resized)")
    patch: int = Field(4, ge=1)
    width: int = Field(128, ge=16)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    # joint: one LayerNorm over the concatenated text layers; layer: one per encoder layer
    text_norm: Literal["joint", "layer"] = "joint"
    # what the network outputs: the velocity, or the clean image x0 (x-prediction, JiT), from
    # which the velocity follows; either way MMDiT.forward returns the velocity
    prediction: Literal["velocity", "x0"] = "velocity"
    # the image patches' sine-cosine frequencies: DiT's (made for large grids), or fitted to
    # this model's grid of patches (`position_embedding_2d`); rope: the fitted ones and 2-D
    # rotary positions on the image queries and keys as well (`rotary_2d`)
    positions: Literal["dit", "grid", "rope"] = "dit"
    # width of a convolution over the caption's tokens after text_in (0: none), so a token
    # carries its neighbours' words ("left" the "red circle" before it) into the blocks
    text_mix: int = Field(0, ge=0)
    # blocks whose text stream is updated (None: all but the last, as SD3); in the others the
    # caption tokens only lend their keys and values to the image's attention
    text_depth: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.image_size % self.patch:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch {self.patch}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.text_depth is not None and self.text_depth >= self.depth:
            raise ValueError(
                f"text_depth {self.text_depth} must be below depth {self.depth}: nothing reads "
                "the caption's tokens after the last block"
            )
        if self.text_mix and self.text_mix % 2 == 0:
            raise ValueError(f"text_mix {self.text_mix} must be odd (as many words each side)")
        return self


class TextConfig(Strict):
    encoder: Literal["all-MiniLM-L6-v2"] = "all-MiniLM-L6-v2"
    # hidden states concatenated per token (0 is the embedding layer), as Lens does with GPT-OSS
    layers: list[int] = Field(default_factory=lambda: [2, 4, 6])
    max_tokens: int = Field(64, ge=4, description="caption token budget; longer ones truncated")


class DataConfig(Strict):
    # caption source -> share of draws; DALL-E 3 used dense 0.95 / alt 0.05, Lens dense only
    caption_mix: dict[CaptionSource, float] = Field(default_factory=lambda: {"dense": 1.0})
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="empty caption, for CFG")
    shuffle_buffer: int = Field(2048, ge=1, description="rows held for shuffling")

    @model_validator(mode="after")
    def _mix(self) -> DataConfig:
        if not self.caption_mix or any(v < 0 for v in self.caption_mix.values()):
            raise ValueError("caption_mix needs at least one source with a share >= 0")
        if sum(self.caption_mix.values()) <= 0:
            raise ValueError("caption_mix shares sum to zero")
        return self


class SampleConfig(Strict):
    every: int = Field(250, ge=0, description="steps between sample grids; 0: only at the end")
    prompts: list[str] = Field(default_factory=lambda: list(SAMPLE_PROMPTS))
    per_prompt: int = Field(4, ge=1)
    cfg: float = Field(4.0, ge=0)
    steps: int = Field(32, ge=1, description="Euler steps")


class LensConfig(Strict):
    name: str = "tiny"
    model: ModelConfig = ModelConfig()
    text: TextConfig = TextConfig()
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()
    steps: int = Field(2000, ge=1)
    # a time budget: the run ends after this many minutes of training steps or at `steps`,
    # whichever comes first, and a cosine schedule ends with it, wherever the machine's pace
    minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    # after the warm-up: constant, or a cosine from lr down to 0 at `steps` or at the end of
    # `minutes` (a run stopped early by --max-minutes never gets the low-lr end)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    # adamw: AdamW for every weight; muon: Muon (torch.optim.Muon, its update's RMS matched to
    # AdamW's, so the same lr) for the joint blocks' matrices, AdamW for the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    # flow timesteps: logit_normal (SD3), uniform, or mixed (half each)
    timesteps: Literal["logit_normal", "uniform", "mixed"] = "logit_normal"
    timestep_shift: float = Field(1.0, gt=0, description="SD3 shift; > 1: noisier timesteps")
    # velocity: the plain flow loss; x0: weighted by 3t^2, the error of the implied clean image
    loss_weight: Literal["velocity", "x0"] = "velocity"
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


PRESETS: dict[str, dict[str, Any]] = {
    # ~2.8M parameters; about 0.8 s per batch of 64 on 2 CPU cores
    "tiny": {"name": "tiny"},
    # the CPU preset: `tiny`'s model with what the causes ablation measured
    # (docs/ablation/causes.md): lr 3e-3 with a short warm-up, batch 32 and the 40 caption
    # tokens that name the shapes (3x the steps of batch 64 with 64 tokens), each MiniLM layer
    # normalised on its own (as Lens and SD3 normalise text). The fourth pass measured it at
    # 10 minutes: the third pass's uniform timesteps and x0-weighted loss, with or without
    # x-prediction, learn slower than tiny's own logit-normal velocity loss, so those stay
    # options, not the preset. The tenth pass fitted the patches' position frequencies to the
    # 8x8 grid: 0.33-0.34 at 10 minutes against 0.21 with DiT's. The thirteenth pass moved
    # the blocks' matrices to Muon and the timesteps a little towards the noisy end (shift
    # 1.5): 0.44-0.47 over three seeds in the time AdamW made 0.30 over two. The sixteenth
    # pass let each caption token read its neighbours (`text_mix`), so the caption places the
    # shapes on every seed, and the shift went back to 1: 0.50-0.57 in 1,840 steps. The
    # seventeenth pass stopped updating the caption's tokens in the blocks (`text_depth` 0:
    # they only lend keys and values, as in a cross-attention DiT): 1.34x the steps, and
    # 0.65-0.70 in the time the sixteenth pass's made 0.50-0.57
    "cpu": {
        "name": "cpu",
        "model": {"text_norm": "layer", "positions": "grid", "text_mix": 9, "text_depth": 0},
        "text": {"max_tokens": 40},
        "batch_size": 32,
        "lr": 3e-3,
        "warmup_steps": 50,
        "lr_schedule": "cosine",
        "optimizer": "muon",
    },
    # for one GPU: 64x64 pixels, ~44M parameters
    "small": {
        "name": "small",
        "model": {"image_size": 64, "patch": 4, "width": 384, "depth": 8, "heads": 6},
        "text": {"max_tokens": 128},
        "batch_size": 128,
        "lr": 3e-4,
        "warmup_steps": 500,
        "ema_decay": 0.9995,
        "steps": 20000,
        "checkpoint_every": 1000,
        "sample": {"every": 1000},
    },
}


def load_lens_config(preset: str, overrides: list[str] = ()) -> LensConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown lens config {preset!r}; choose one of {', '.join(PRESETS)}")
    return with_overrides(LensConfig, deepcopy(PRESETS[preset]), list(overrides))
