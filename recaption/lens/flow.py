"""Rectified flow: the training loss and the Euler sampler with classifier-free guidance.

x_t = (1 - t) x_0 + t e, e ~ N(0, I), and the model predicts the velocity v = e - x_0.
Timesteps are logit-normal (SD3, Lens): most training lands on the middle of the path,
where the velocity is hardest to predict. Sampling integrates from t = 1 (noise) to 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> v


def logit_normal(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=generator)).to(device)


def uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device)


def mixed(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Half uniform, half logit-normal: the noisy end, where a 32x32 scene's background and
    layout are decided, gets trained, and so does the middle, where its shapes take form."""
    u, ln = torch.rand(n, generator=generator), torch.sigmoid(torch.randn(n, generator=generator))
    pick = torch.rand(n, generator=generator) < 0.5
    return torch.where(pick, u, ln).to(device)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: shift > 1 moves training towards the noisy end of the path."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


TIMESTEPS = {"logit_normal": logit_normal, "uniform": uniform, "mixed": mixed}


def loss_weight(t: torch.Tensor, weighting: str) -> torch.Tensor | float:
    """Per-sample weight on the squared velocity error. `velocity`: none. `x0`: 3 t^2, the
    squared error of the implied clean image x0 = x_t - t v (scaled to mean 1 under uniform
    t). The plain velocity error is the x0 error over t^2, so at small t it is dominated by
    the noise left in nearly clean images; on 32x32 scenes that spends the early steps on
    pixel noise instead of the background, layout and shapes the caption decides
    (docs/ablation/causes.md, third pass)."""
    if weighting == "velocity":
        return 1.0
    if weighting == "x0":
        return 3 * t.view(-1, 1, 1, 1) ** 2
    raise ValueError(f"unknown loss weighting {weighting!r}")


def flow_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    timesteps: str = "logit_normal",
    shift: float = 1.0,
    weighting: str = "velocity",
) -> torch.Tensor:
    """Mean squared error of the predicted velocity, weighted per sample (`loss_weight`). Noise comes from `generator` (on the
    CPU, so that a resumed run draws exactly what an uninterrupted one would)."""
    t = shift_timesteps(TIMESTEPS[timesteps](x0.shape[0], generator, x0.device), shift)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    tb = t.view(-1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * noise
    error = (model(xt, t, text, mask) - (noise - x0)).float().pow(2)
    return (error * loss_weight(t.float(), weighting)).mean()


@torch.no_grad()
def euler_sample(velocity: Velocity, noise: torch.Tensor, steps: int) -> torch.Tensor:
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for t, t_next in itertools.pairwise(ts):
        x = x + (t_next - t) * velocity(x, t.expand(x.shape[0]))
    return x


def guided(
    model: torch.nn.Module,
    text: torch.Tensor,
    mask: torch.Tensor,
    empty: torch.Tensor,
    empty_mask: torch.Tensor,
    scale: float,
) -> Velocity:
    """Classifier-free guidance: v = v(empty) + scale * (v(text) - v(empty)), in one batched
    call. `empty` is the empty caption's features, [1, T, D]."""
    n, length = text.shape[0], max(text.shape[1], empty.shape[1])
    text, mask = _pad(text, mask, length)
    empty, empty_mask = _pad(empty, empty_mask, length)
    both_text = torch.cat([text, empty.expand(n, -1, -1)])
    both_mask = torch.cat([mask, empty_mask.expand(n, -1)])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return model(x, t, text, mask)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), both_text, both_mask).chunk(2)
        return uncond + scale * (cond - uncond)

    return velocity


def _pad(
    tokens: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    return (
        torch.nn.functional.pad(tokens, (0, 0, 0, extra)),
        torch.nn.functional.pad(mask, (0, extra), value=False),
    )
