"""`recaption lens train`: the training loop. Start reading at `train`.

corpus Parquet ─(CorpusStream, background thread)─▶ images + captions ─(TextEncoder, cached)─▶
text tokens ─▶ MMDiT, rectified-flow loss ─▶ Muon + AdamW, EMA ─▶ metrics, checkpoints, sample grids

A killed run resumes from its last checkpoint with the same next step as if it had never
stopped: the checkpoint holds the model, EMA, the optimisers, the noise generator and the
data stream's position.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recaption.lens.config import LensConfig
from recaption.lens.data import Batch, CorpusStream, prefetch
from recaption.lens.flow import flow_loss
from recaption.lens.model import MMDiT
from recaption.lens.run import RunDir, save_grid
from recaption.lens.sample import generate, pick_device
from recaption.lens.text import TextEncoder


@dataclass
class TrainSummary:
    run: Path
    steps: int  # the step the run reached
    resumed_from: int  # 0: a fresh run
    losses: list[float] = field(default_factory=list)  # per step, this invocation
    samples_per_s: float = 0.0
    truncated: float = 0.0  # share of trained captions cut at the token budget
    sources: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        mix = ", ".join(f"{k} {v}" for k, v in sorted(self.sources.items()))
        out = [
            f"trained {self.run} to step {self.steps}"
            + (f" (resumed from {self.resumed_from})" if self.resumed_from else ""),
        ]
        if self.losses:
            tail = self.losses[-min(len(self.losses), 50) :]
            out.append(
                f"loss {np.mean(tail):.4f} (mean of the last {len(tail)} steps), "
                f"{self.samples_per_s:.1f} samples/s"
            )
        out.append(f"captions drawn: {mix}; {self.truncated:.1%} cut at the token budget")
        return out


def to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


def fraction_done(cfg: LensConfig, step: int, seconds: float) -> float:
    """How far the run is, 0..1: by steps, or by training time when it has a time budget."""
    done = step / cfg.steps
    if cfg.minutes is not None:
        done = max(done, seconds / (60 * cfg.minutes))
    return min(1.0, done)


def learning_rate(cfg: LensConfig, step: int, seconds: float = 0.0) -> float:
    """The lr of step `step` (0-based) after `seconds` of training: a linear warm-up, then
    constant or a cosine to 0 at the run's end. Without a time budget it is a function of the
    step alone, so a resumed run takes exactly the steps it would have; with one, the
    schedule follows the clock (checkpointed), so it ends when the budget does on any
    machine, but is not bit-for-bit reproducible."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * fraction_done(cfg, step, seconds)))
    return lr


def make_optimizers(model: MMDiT, cfg: LensConfig) -> list[torch.optim.Optimizer]:
    """AdamW over every weight, or (`optimizer: muon`) Muon over the joint blocks' matrices and
    AdamW over the rest (embeddings, the output head, norms and biases), the split Muon's
    authors use: it orthogonalises 2-D hidden weights' updates only."""
    adamw = {"betas": (0.9, 0.99), "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=cfg.lr, **adamw)]
    hidden = [
        p for name, p in model.named_parameters() if name.startswith("blocks.") and p.ndim == 2
    ]
    chosen = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [
        torch.optim.Muon(
            hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
        ),
        torch.optim.AdamW(rest, lr=cfg.lr, **adamw),
    ]


def train(
    corpus: str,
    cfg: LensConfig,
    out: str | Path,
    cache_dir: Path | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
) -> TrainSummary:
    """Train to `cfg.steps` or the end of `cfg.minutes` of training, or stop early after
    `max_seconds` with a checkpoint that a later call resumes from."""
    run = RunDir(out)
    device = pick_device(cfg.device)
    if "://" not in corpus:
        corpus = os.path.abspath(corpus)  # the run records where its data came from
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None:
        run.check_resumable(cfg, corpus)

    torch.manual_seed(cfg.seed)
    stream = CorpusStream(corpus, cfg.data, cfg.model.image_size, seed=cfg.seed)
    encoder = TextEncoder(cfg.text, cache_dir, device)
    model = MMDiT(cfg.model, encoder.dim, text_layers=len(cfg.text.layers)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizers = make_optimizers(model, cfg)
    noise = torch.Generator().manual_seed(cfg.seed)  # timesteps and noise, on the CPU
    step, seconds = 0, 0.0  # seconds: spent in training steps, over every invocation
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        saved = state["optimizer"]
        for optimizer, opt_state in zip(
            optimizers, saved if isinstance(saved, list) else [saved], strict=True
        ):
            optimizer.load_state_dict(opt_state)
        noise.set_state(state["noise"])
        stream.epoch, stream.consumed = state["stream"]["epoch"], state["stream"]["consumed"]
        stream.drawn = Counter(state["stream"]["drawn"])
        step, seconds = state["step"], state.get("seconds", 0.0)
        run.truncate_metrics(step)
    run.write_config(
        {
            "config": cfg.model_dump(mode="json"),
            "corpus": corpus,
            "corpus_rows": stream.rows,
            "text_encoder": encoder.identity,
            "caption_mix": cfg.data.caption_mix,
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device),
            "torch": torch.__version__,
        }
    )
    summary = TrainSummary(run=run.path, steps=step, resumed_from=step)
    if fraction_done(cfg, step, seconds) >= 1:
        return summary

    # bf16 autocast where it pays (GPU); on the CPU fp32 is faster and exact on resume
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = prefetch(stream.batches(cfg.batch_size))
    window = _Window()
    total = cfg.steps if cfg.minutes is None else None  # a time budget: steps unknown
    bar = tqdm(total=total, initial=step, disable=not progress, desc="lens train", unit="step")
    started, start_step = time.perf_counter(), step
    model.train()
    try:
        while True:
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            text = encoder(batch.captions)
            x0 = to_pixels(batch.images, device)
            t2 = time.perf_counter()
            lr = learning_rate(cfg, step, seconds)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            with autocast:
                loss = flow_loss(
                    model,
                    x0,
                    text.tokens,
                    text.mask,
                    noise,
                    cfg.timesteps,
                    cfg.timestep_shift,
                    cfg.loss_weight,
                )
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for optimizer in optimizers:
                optimizer.step()
            update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            value = loss.item()
            if not math.isfinite(value):
                raise RuntimeError(f"loss is {value} at step {step}; lower lr or check the data")
            took = time.perf_counter() - t0
            seconds += took
            summary.losses.append(value)
            window.add(value, t1 - t0, t2 - t1, took, batch, text.truncated)
            bar.update(1)
            last = fraction_done(cfg, step, seconds) >= 1 or (
                max_seconds is not None and time.perf_counter() - started > max_seconds
            )
            if step % cfg.log_every == 0 or last:
                row = window.flush(step, lr, batch.state["epoch"], cfg.batch_size)
                run.append_metrics(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.0f}")
            if step % cfg.checkpoint_every == 0 or last:
                run.save_checkpoint(
                    step,
                    {
                        "step": step,
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": [optimizer.state_dict() for optimizer in optimizers],
                        "noise": noise.get_state(),
                        "stream": batch.state,
                        "seconds": seconds,
                    },
                    cfg.keep_checkpoints,
                )
                run.plot_loss()
            if (cfg.sample.every and step % cfg.sample.every == 0) or last:
                write_sample_grid(run, ema, encoder, cfg, step)
            if last:
                break
    finally:
        bar.close()
        batches.close()
    elapsed = time.perf_counter() - started
    summary.steps = step
    summary.samples_per_s = (step - start_step) * cfg.batch_size / max(elapsed, 1e-9)
    summary.sources = dict(batch.state["drawn"])
    summary.truncated = window.total_truncated / max(1, window.total_captions)
    return summary


def write_sample_grid(
    run: RunDir, model: MMDiT, encoder: TextEncoder, cfg: LensConfig, step: int
) -> Path:
    s = cfg.sample
    images = generate(model, encoder, s.prompts, s.per_prompt, s.cfg, s.steps, seed=cfg.seed)
    path = save_grid(images, s.per_prompt, run.samples / f"step-{step:07d}.png", scale=3)
    (run.samples / "prompts.txt").write_text("\n".join(s.prompts) + "\n")
    return path


class _Window:
    """Metrics over the steps since the last log line."""

    def __init__(self) -> None:
        self.total_truncated = self.total_captions = 0
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.data_s = self.text_s = self.step_s = 0.0
        self.truncated = self.captions = 0
        self.sources: Counter = Counter()

    def add(
        self,
        loss: float,
        data_s: float,
        text_s: float,
        step_s: float,
        batch: Batch,
        truncated: list[bool],
    ) -> None:
        self.losses.append(loss)
        self.data_s += data_s
        self.text_s += text_s
        self.step_s += step_s
        self.truncated += sum(truncated)
        self.captions += len(truncated)
        self.total_truncated += sum(truncated)
        self.total_captions += len(truncated)
        self.sources.update(batch.sources)

    def flush(self, step: int, lr: float, epoch: int, batch_size: int) -> dict:
        n = len(self.losses)
        row = {
            "step": step,
            "loss": float(np.mean(self.losses)),
            "lr": lr,
            "epoch": epoch,
            "steps_per_s": n / self.step_s,
            "samples_per_s": n * batch_size / self.step_s,
            "data_wait": self.data_s / self.step_s,  # share of step time waiting for images
            "text_time": self.text_s / self.step_s,  # share spent on text features
            "truncated": self.truncated / max(1, self.captions),
            "sources": dict(self.sources),
        }
        self._reset()
        return row
