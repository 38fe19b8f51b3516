"""List prices and image-token rules of the hosted vision models.

Prices are US dollars per million tokens (OpenAI's list prices, standard tier, no cached
input). Image tokens follow OpenAI's published rules: GPT-4o / GPT-4.1 count 512-px tiles,
the GPT-4.1-mini / -nano family counts 32-px patches. Dated snapshots ("gpt-4.1-2025-04-14")
match their base name. Models not listed (a local VLM) cost nothing unless
`captioner.price` says otherwise, and are token-counted with the GPT-4o tile rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recaption.config import PriceConfig


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6

    def batch(self) -> Price:
        """The Batch API's price: half the online one, input and output alike."""
        return Price(self.input_per_mtok * BATCH_DISCOUNT, self.output_per_mtok * BATCH_DISCOUNT)


BATCH_DISCOUNT = 0.5


PRICES: dict[str, Price] = {
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
}
FREE = Price(0.0, 0.0)


@dataclass(frozen=True)
class TileRule:
    base: int
    per_tile: int


@dataclass(frozen=True)
class PatchRule:
    multiplier: float
    max_patches: int = 1536


_IMAGE_RULES: dict[str, TileRule | PatchRule] = {
    "gpt-4.1": TileRule(85, 170),
    "gpt-4.1-mini": PatchRule(1.62),
    "gpt-4.1-nano": PatchRule(2.46),
    "gpt-4o": TileRule(85, 170),
    "gpt-4o-mini": TileRule(2833, 5667),
}


def _base_name(model: str, table: dict) -> str | None:
    """The longest table key that `model` is, or starts with followed by a '-' suffix."""
    best = None
    for name in table:
        if (model == name or model.startswith(name + "-")) and (
            best is None or len(name) > len(best)
        ):
            best = name
    return best


def price_for(model: str, override: Price | PriceConfig | None = None) -> Price:
    """The list price of `model`, unless `override` (captioner.price) sets one."""
    if override is not None:
        return Price(override.input_per_mtok, override.output_per_mtok)
    name = _base_name(model, PRICES)
    return PRICES[name] if name else FREE


def image_tokens(model: str, width: int, height: int, detail: str = "high") -> int:
    """Input tokens one image costs, by the model's rule."""
    name = _base_name(model, _IMAGE_RULES)
    rule = _IMAGE_RULES[name] if name else _IMAGE_RULES["gpt-4o"]
    if isinstance(rule, PatchRule):
        patches = math.ceil(width / 32) * math.ceil(height / 32)
        if patches > rule.max_patches:  # shrink to fit the patch budget, whole patches per side
            shrink = math.sqrt(32 * 32 * rule.max_patches / (width * height))
            w_patches = width * shrink / 32
            h_patches = height * shrink / 32
            shrink *= min(math.floor(w_patches) / w_patches, math.floor(h_patches) / h_patches)
            patches = math.ceil(width * shrink / 32) * math.ceil(height * shrink / 32)
        return math.ceil(patches * rule.multiplier)
    if detail == "low":
        return rule.base
    scale = min(1.0, 2048 / max(width, height))  # fit in a 2048 square
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))  # then the shortest side to 768
    w, h = w * scale, h * scale
    return rule.base + rule.per_tile * math.ceil(w / 512) * math.ceil(h / 512)
