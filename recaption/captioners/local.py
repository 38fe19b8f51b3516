"""The `transformers` captioner: a local VLM loaded from a directory, no server, no hub.

Qwen2.5-VL, SmolVLM, LLaVA, InternVL ... whatever `AutoModelForImageTextToText` loads,
with the model's own processor and chat template. Per worker (one Ray actor per GPU with
`ray.gpus_per_worker: 1`):

    caption(image) ─▶ queue ─▶ batch of up to `captioner.batch_size` (waits ≤ batch_wait_ms)
      ─▶ processor(chat template + images, left padding) ─▶ model.generate, in a thread
         so the event loop keeps reading and preparing the next images
      ─▶ JSON caption, or (a model that cannot write JSON) a dense-caption-only record

A reply cut at the token budget is `truncated_output`; degenerate repetition is caught by
validation (`validation.max_repeated_ngram_share`), with `captioner.repetition_penalty`
keeping greedy decoding out of loops in the first place.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError

from recaption.captioners.base import Captioner, CaptionFailure, CaptionResult
from recaption.captioners.prompt import (
    USER_TEXT,
    load_prompt,
    parse_json_object,
    prompt_with_schema,
)
from recaption.config import CaptionerConfig, PipelineConfig
from recaption.errors import ConfigError
from recaption.images import PreparedImage
from recaption.records import Caption, Reason, Usage

CPU_BATCH = 4
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def check_model_path(cfg: CaptionerConfig) -> Path:
    """The model directory, checked before any worker starts."""
    if not cfg.model_path:
        raise ConfigError(
            "captioner.model_path: the transformers backend loads a VLM from a local "
            "directory (e.g. --set captioner.model_path=/models/Qwen2.5-VL-3B-Instruct)"
        )
    path = Path(cfg.model_path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"captioner.model_path {path}: no config.json there (a saved model?)")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the transformers backend needs torch and transformers ({exc.name} is missing): "
            "pip install 'recaption[local]'"
        ) from None
    return path


def fallback_caption(text: str) -> Caption:
    """A record from a reply that is not JSON: the text is the dense caption, its first
    sentence the short one; objects and visible text stay empty rather than guessed."""
    text = " ".join(text.split())
    return Caption(
        caption=text,
        caption_short=_SENTENCE.split(text, maxsplit=1)[0],
        objects=[],
        visible_text=[],
        style="",
    )


def read_reply(text: str) -> tuple[Caption, bool]:
    """(caption, whether it came as schema-valid JSON)."""
    try:
        return Caption.model_validate(parse_json_object(text)), True
    except (ValueError, ValidationError):
        return fallback_caption(text), False


class TransformersCaptioner(Captioner):
    backend = "transformers"

    def __init__(self, config: PipelineConfig, limiters: dict[str, Any] | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(config, limiters)
        self.cfg = cfg = config.captioner
        path = check_model_path(cfg)
        self.model = cfg.model or path.name
        self.prompt_version, prompt = load_prompt(cfg.prompt)
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = torch.bfloat16 if cuda else torch.float32
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        self.vlm = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype=self.dtype
        )
        self.vlm.to(self.device).eval()
        # the schema rides in the prompt: local models get no structured-output format
        messages = [
            {"role": "system", "content": prompt_with_schema(prompt)},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER_TEXT}]},
        ]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        self.batch_size = cfg.batch_size or self._batch_by_memory()
        self.timings: Counter[str] = Counter()  # generate_s, batches, images: for bench/
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batcher: asyncio.Task | None = None

    @classmethod
    def identity(cls, cfg: PipelineConfig) -> tuple[str, str]:
        model = cfg.captioner.model or check_model_path(cfg.captioner).name
        return model, load_prompt(cfg.captioner.prompt)[0]

    @classmethod
    def check(cls, cfg: PipelineConfig) -> None:
        check_model_path(cfg.captioner)

    def _batch_by_memory(self) -> int:
        """On a GPU: as many sequences as half the free memory holds in KV cache."""
        if self.device.type != "cuda":
            return CPU_BATCH
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        text = self.vlm.config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_token = 2 * text.num_hidden_layers * heads * head_dim * 2  # K and V, bf16
        tokens = 2048 + self.cfg.max_output_tokens  # a generous prompt with image tokens
        return max(1, min(64, int(free * 0.5 // (per_token * tokens))))

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        self._queue = self._loop = self._batcher = None

    # -- one image, in batches ----------------------------------------------------------------

    async def caption(self, image: PreparedImage) -> CaptionResult:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a queue and its batcher belong to one event loop
            self._queue, self._loop = asyncio.Queue(), loop
            self._batcher = loop.create_task(self._batches())
        done: asyncio.Future = loop.create_future()
        await self._queue.put((image, done))
        return await done

    async def _batches(self) -> None:
        assert self._queue is not None
        wait = self.cfg.batch_wait_ms / 1000
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + wait
            while len(batch) < self.batch_size:
                try:
                    left = deadline - time.monotonic()
                    batch.append(await asyncio.wait_for(self._queue.get(), max(left, 0)))
                except TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(self._generate, [im for im, _ in batch])
            except Exception as exc:  # the whole batch failed (out of memory, a bad image)
                detail = f"{type(exc).__name__}: {exc}"
                results = [
                    CaptionFailure(Reason.caption_error, detail, Usage(attempts=1)) for _ in batch
                ]
            for (_, done), result in zip(batch, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, CaptionFailure):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    def _generate(self, prepared: list[PreparedImage]) -> list[CaptionResult | CaptionFailure]:
        import torch

        images = [Image.open(io.BytesIO(p.data)).convert("RGB") for p in prepared]
        inputs = self.processor(
            text=[self.text] * len(images), images=images, padding=True, return_tensors="pt"
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        sample = bool(self.cfg.temperature)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.vlm.generate(
                **inputs,
                max_new_tokens=self.cfg.max_output_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=None,
                top_k=None,
                repetition_penalty=self.cfg.repetition_penalty,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        self.timings.update(generate_s=time.perf_counter() - t0, batches=1, images=len(images))
        prompt_len = inputs["input_ids"].shape[1]
        new = out[:, prompt_len:]
        eos = self.vlm.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        results: list[CaptionResult | CaptionFailure] = []
        for row, text, prompt_tokens in zip(
            new.tolist(), texts, inputs["attention_mask"].sum(1).tolist(), strict=True
        ):
            ended = any(t in eos_ids for t in row)
            output_tokens = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            usage = Usage(int(prompt_tokens), output_tokens, attempts=1)
            if not ended:
                usage.outcomes.update(requests=1, truncated=1)
                detail = f"no end of reply within max_output_tokens={self.cfg.max_output_tokens}"
                results.append(CaptionFailure(Reason.truncated_output, detail, usage))
            else:
                caption, as_json = read_reply(text)
                usage.outcomes.update(requests=1, **{"json" if as_json else "text_fallback": 1})
                results.append(CaptionResult(caption=caption, usage=usage))
            self.counters.update(usage.outcomes)
        return results

    def image_tokens(self, image: PreparedImage) -> int:
        """Prompt tokens this image adds: visual tokens dominate a local VLM's prefill."""
        im = Image.open(io.BytesIO(image.data)).convert("RGB")
        with_image = self.processor(text=[self.text], images=[im], return_tensors="pt")
        text_only = self.tokenizer(self.text, return_tensors="pt")
        return int(with_image["input_ids"].shape[1] - text_only["input_ids"].shape[1] + 1)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
        }
