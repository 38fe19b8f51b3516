"""A small MMDiT, as in SD3 and Lens: text and image tokens in one joint attention.

Each stream (text, image) has its own weights (norms, QKV, output projection, MLP) and its
own adaLN-Zero modulation from the conditioning vector (timestep + pooled text); only the
attention is shared, over the concatenated sequence. Image tokens are patches with fixed 2-D
sine-cosine positions (DiT's frequencies, or fitted to the grid; optionally rotary positions in
the attention too); the final layer predicts each patch (its velocity, or its clean pixels).
Optionally (`text_mix`, the `cpu` preset's) each caption token is first mixed with its
neighbours, channel by channel, so the words that place a shape reach the image with its
colour and kind (MiniLM's tokens carry their own word only: docs/ablation/token_content.py).
With `text_depth: 0` (the `cpu` preset's) the caption's tokens are never updated: each block's
text stream only lends keys and values to the image's attention, as a cross-attention DiT's
caption does, and a step costs three quarters of one that updates them.

The model works on whatever `x` is: pixels here. A latent autoencoder would sit outside it,
turning images into `x` and back (`channels` is the seam).

The network outputs the velocity, or (`prediction: x0`) the clean image, from which the
velocity follows: v = (x_t - x0) / t, as JiT ("Back to Basics: Let Denoising Generative Models
Denoise") does in pixel space, where at high noise the velocity is mostly the noise itself.
Under uniform timesteps and the x0-weighted loss it draws the caption's colours on clean
backgrounds within a few hundred steps where the velocity draws nothing; at 10 minutes it did
not beat `tiny`'s logit-normal velocity loss (docs/ablation/causes.md, fourth pass).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recaption.lens.config import ModelConfig

MIN_T = 0.05  # x-prediction: the velocity (x_t - x0) / t is taken at t >= MIN_T


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def grid_frequencies(grid: int, n: int) -> torch.Tensor:
    """n angular frequencies, per patch, for positions on a grid of `grid` patches a side:
    wavelengths from 4 patches to 4 * grid, geometrically spaced."""
    return (math.pi / 2) / grid ** (torch.arange(n) / n)


def position_embedding_2d(grid: int, dim: int, fit: bool = False) -> torch.Tensor:
    """Fixed sine-cosine positions for a grid x grid of patches: [grid*grid, dim].

    DiT's frequencies (wavelengths 2*pi to 2*pi*10,000 patches) are made for large grids: on
    an 8x8 grid most of them barely turn, so 86% of the embedding is the same at every
    patch and neighbouring patches' embeddings have a cosine of 0.98. `fit` spreads the
    frequencies over the grid instead (wavelengths 4 to 4*grid patches): 74% of it varies
    with the position, neighbours' cosine 0.86."""
    quarter = dim // 4
    if fit:
        omega = grid_frequencies(grid, quarter)
    else:
        omega = 1.0 / 10_000 ** (torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.flatten().float()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(ys), axis(xs)], dim=1)


def rotary_2d(grid: int, head_dim: int) -> torch.Tensor:
    """2-D rotary angles for a grid x grid of patches: [grid*grid, head_dim // 2], half of
    each head's channel pairs turned by the patch's row, half by its column, at the grid-fitted
    frequencies of `position_embedding_2d`."""
    theta = grid_frequencies(grid, head_dim // 4)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([ys.flatten()[:, None] * theta, xs.flatten()[:, None] * theta], dim=1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Turn each consecutive channel pair of x [..., n, head_dim] by angles [n, head_dim // 2]."""
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class Stream(nn.Module):
    """One stream's half of a joint block: its own modulation, QKV, projection and MLP.

    `lends_only`: the stream's tokens are not updated in this block; they only lend keys and
    values to the attention, so it has no queries, projection or MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, lends_only: bool = False):
        super().__init__()
        self.heads = heads
        self.lends_only = lends_only
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, (2 if lends_only else 3) * width)
        self.k_norm = nn.RMSNorm(width // heads, eps=1e-6)  # QK-norm keeps attention stable
        if not lends_only:
            self.q_norm = nn.RMSNorm(width // heads, eps=1e-6)
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            hidden = int(width * mlp_ratio)
            self.mlp = nn.Sequential(
                nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
            )
        # created last, as before `lends_only`, so a seed draws the same weights it did
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, (2 if lends_only else 6) * width))
        nn.init.zeros_(self.adaln[1].weight)  # adaLN-Zero: every block starts as identity
        nn.init.zeros_(self.adaln[1].bias)

    def attend_inputs(self, x: torch.Tensor, c: torch.Tensor) -> tuple[tuple, tuple]:
        """(q, k, v) per head (q None for a stream that only lends), and the modulation that
        `finish` uses."""
        mod = self.adaln(c).chunk(2 if self.lends_only else 6, dim=-1)
        b, n, w = x.shape
        qkv = self.qkv(modulate(self.norm1(x), mod[0], mod[1]))
        parts = qkv.view(b, n, -1, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if self.lends_only:
            return (None, self.k_norm(parts[0]), parts[1]), mod
        return (self.q_norm(parts[0]), self.k_norm(parts[1]), parts[2]), mod

    def finish(self, x: torch.Tensor, attended: torch.Tensor, mod: tuple) -> torch.Tensor:
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + gate1.unsqueeze(1) * self.proj(attended)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JointBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, text_lends_only: bool = False):
        super().__init__()
        self.text = Stream(width, heads, mlp_ratio, lends_only=text_lends_only)
        self.image = Stream(width, heads, mlp_ratio)

    def forward(
        self,
        txt: torch.Tensor,
        img: torch.Tensor,
        c: torch.Tensor,
        keep: torch.Tensor,
        last: bool = False,
        angles: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`last`: the text is not updated in this block (nothing reads it after the last
        block, as in SD3; or the text stream only lends keys and values), so its queries,
        projection and MLP are skipped; the text is returned as it came.
        `angles`: the image queries and keys are turned by their patch's place (`rotary_2d`);
        the text's are not, as in FLUX."""
        last = last or self.text.lends_only
        (t_q, t_k, t_v), t_mod = self.text.attend_inputs(txt, c)
        (i_q, i_k, i_v), i_mod = self.image.attend_inputs(img, c)
        if angles is not None:
            i_q, i_k = rotate(i_q, angles), rotate(i_k, angles)
        q = i_q if last else torch.cat([t_q, i_q], dim=2)
        k, v = torch.cat([t_k, i_k], dim=2), torch.cat([t_v, i_v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)
        if last:
            return txt, self.image.finish(img, out, i_mod)
        n = txt.shape[1]
        return self.text.finish(txt, out[:, :n], t_mod), self.image.finish(img, out[:, n:], i_mod)


class TextNorm(nn.Module):
    """Normalise the concatenated encoder layers before they enter the model.

    One LayerNorm per encoder layer, so each layer arrives at unit scale whatever its raw
    scale (MiniLM's last layer is ~2.5x smaller than its middle ones), as Lens and SD3
    normalise text features. `text_norm: joint` instead uses one LayerNorm over the whole
    concatenation (the original model)."""

    def __init__(self, text_dim: int, layers: int):
        super().__init__()
        if text_dim % layers:
            raise ValueError(f"text_dim {text_dim} does not split into {layers} layers")
        self.layers = layers
        self.norm = nn.LayerNorm(text_dim // layers)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        parts = text.unflatten(-1, (self.layers, -1))
        return self.norm(parts).flatten(-2)


class MMDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, text_dim: int, channels: int = 3, text_layers: int = 1):
        super().__init__()
        self.cfg = cfg
        self.channels = channels
        w, p = cfg.width, cfg.patch
        self.grid = cfg.image_size // p
        self.patch_in = nn.Linear(channels * p * p, w)
        pos = position_embedding_2d(self.grid, w, fit=cfg.positions != "dit")
        self.register_buffer("pos", pos[None], persistent=False)
        angles = rotary_2d(self.grid, w // cfg.heads) if cfg.positions == "rope" else None
        self.register_buffer("angles", angles, persistent=False)
        # joint keeps the original layout (text_in.0 a LayerNorm), so old runs still load
        norm = (
            nn.LayerNorm(text_dim) if cfg.text_norm == "joint" else TextNorm(text_dim, text_layers)
        )
        self.text_in = nn.Sequential(norm, nn.Linear(text_dim, w))
        self.text_mix = None
        if cfg.text_mix:
            k = cfg.text_mix
            # depthwise: each channel mixes its own neighbours; starts as the identity
            self.text_mix = nn.Conv1d(w, w, k, padding=k // 2, groups=w, bias=False)
            with torch.no_grad():
                self.text_mix.weight.zero_()
                self.text_mix.weight[:, 0, k // 2] = 1
        self.time_mlp = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.pooled_mlp = nn.Sequential(nn.Linear(text_dim, w), nn.SiLU(), nn.Linear(w, w))
        # the blocks that update the caption's tokens; in the others (after `text_depth`) the
        # caption only lends keys and values. Unset: all but the last, whose text stream
        # keeps its unused weights, so runs from before `text_depth` still load
        self.text_depth = cfg.depth - 1 if cfg.text_depth is None else cfg.text_depth
        self.blocks = nn.ModuleList(
            JointBlock(
                w, cfg.heads, cfg.mlp_ratio, cfg.text_depth is not None and i >= cfg.text_depth
            )
            for i in range(cfg.depth)
        )
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.patch_out = nn.Linear(w, channels * p * p)
        for layer in (self.final_adaln[1], self.patch_out):  # the model starts predicting 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """x: [B, C, H, W]; t: [B] in [0, 1]; text: [B, T, D]; mask: [B, T] real tokens.
        Returns the predicted velocity, shaped like x, whatever the network predicts."""
        b = x.shape[0]
        img = self.patch_in(self.patchify(x)) + self.pos
        if self.cfg.text_norm == "joint":
            txt = self.text_in(text)  # the pooled vector below sees raw features
        else:
            text = self.text_in[0](text)  # the pooled vector sees normalised features too
            txt = self.text_in[1](text)
        m = mask.to(text.dtype).unsqueeze(-1)
        if self.text_mix is not None:
            txt = txt * m  # padding must not leak into the last real tokens
            txt = self.text_mix(txt.transpose(1, 2)).transpose(1, 2)
        pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)
        c = self.time_mlp(timestep_embedding(t, 256).to(x.dtype)) + self.pooled_mlp(pooled)
        # keys that may be attended to: real text tokens and every image token
        keep = torch.cat([mask, mask.new_ones(b, img.shape[1])], dim=1)[:, None, None, :]
        for i, block in enumerate(self.blocks):
            txt, img = block(txt, img, c, keep, i >= self.text_depth, self.angles)
        shift, scale = self.final_adaln(c).chunk(2, dim=-1)
        out = self.unpatchify(self.patch_out(modulate(self.final_norm(img), shift, scale)))
        if self.cfg.prediction == "velocity":
            return out
        # the clamp bounds the velocity of nearly clean inputs, where x0 ~ x_t anyway
        return (x - out) / t.view(-1, 1, 1, 1).to(x.dtype).clamp(min=MIN_T)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        p, g = self.cfg.patch, self.grid
        return x.view(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        p, g, c = self.cfg.patch, self.grid, self.channels
        return tokens.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)
