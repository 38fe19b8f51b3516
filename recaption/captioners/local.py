"""The `transformers` captioner: a local VLM loaded from a directory, no server, no hub.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM, Idefics3, Gemma 3, LLaVA ... whatever
`AutoModelForImageTextToText` loads, with the model's own processor, chat template and
special tokens (`vlm_inputs.py`: the same on CPU and GPU, with or without torchvision). Per
worker (one Ray actor per GPU with `ray.gpus_per_worker: 1`):

    caption(image) ─▶ queue ─▶ batch of up to `captioner.batch_size` (waits ≤ batch_wait_ms)
      ─▶ processor, in a thread: chat template + one image per prompt, left padding; it
         encodes the next batch while the model generates this one
      ─▶ model.generate, in another thread, so the event loop reads and prepares images on
      ─▶ JSON caption, or (a model that cannot write JSON) a dense-caption-only record

A reply cut at the token budget is `truncated_output`; degenerate repetition is caught by
validation (`validation.max_repeated_ngram_share`), with `captioner.repetition_penalty`
keeping greedy decoding out of loops in the first place.
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError

from recaption.captioners.base import Captioner, CaptionFailure, CaptionResult
from recaption.captioners.prompt import load_prompt, parse_json_object, prompt_with_schema
from recaption.captioners.vlm_inputs import Inputs, torchvision_usable
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
    torchvision_usable()  # absent is fine; present but broken is a config error
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


def image_token_id(config: Any) -> int:
    """The placeholder id the model swaps for image features (named two ways in configs)."""
    for name in ("image_token_id", "image_token_index"):
        if (value := getattr(config, name, None)) is not None:
            return int(value)
    raise ConfigError(f"{config.model_type}: the model config names no image token")


def _failed(exc: Exception, n: int) -> list[CaptionResult | CaptionFailure]:
    detail = f"{type(exc).__name__}: {exc}"
    return [CaptionFailure(Reason.caption_error, detail, Usage(attempts=1)) for _ in range(n)]


def _settle(batch: list[tuple[PreparedImage, asyncio.Future]], results: list) -> None:
    for (_, done), result in zip(batch, results, strict=True):
        if done.done():  # its caller gave up (cancelled)
            continue
        if isinstance(result, CaptionFailure):
            done.set_exception(result)
        else:
            done.set_result(result)


class TransformersCaptioner(Captioner):
    backend = "transformers"

    def __init__(self, config: PipelineConfig, limiters: dict[str, Any] | None = None):
        import torch
        from transformers import AutoModelForImageTextToText

        super().__init__(config, limiters)
        self.cfg = cfg = config.captioner
        path = check_model_path(cfg)
        self.model = cfg.model or path.name
        self.prompt_version, prompt = load_prompt(cfg.prompt)
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = torch.bfloat16 if cuda else torch.float32
        # the schema rides in the prompt: local models get no structured-output format
        self.inputs = Inputs(path, prompt_with_schema(prompt))
        self.processor, self.tokenizer = self.inputs.processor, self.inputs.tokenizer
        self.vlm = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype=self.dtype
        )
        self.vlm.to(self.device).eval()
        self.image_token_id = image_token_id(self.vlm.config)
        eos = self.vlm.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:  # some tokenizers have none: pad with an end token
            self.pad_id = min(self.eos_ids)
        self.batch_size = cfg.batch_size or self._batch_by_memory()
        # seconds in each step and what went through, for bench/ and the tests
        self.timings: Counter[str] = Counter()
        self._tokenizer_lock = threading.Lock()
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
        """Two stages: the next batch is encoded (CPU) while the model generates the one
        before, so preprocessing does not leave the model idle between batches."""
        running: asyncio.Task | None = None
        try:
            while True:
                batch = await self._collect()
                try:
                    inputs = await asyncio.to_thread(self._encode, [im for im, _ in batch])
                except Exception as exc:  # an image the processor cannot take
                    _settle(batch, _failed(exc, len(batch)))
                    continue
                if running is not None:
                    await running
                running = asyncio.create_task(self._run(batch, inputs))
        finally:
            if running is not None:
                running.cancel()

    async def _collect(self) -> list[tuple[PreparedImage, asyncio.Future]]:
        """Up to batch_size queued images, waiting at most batch_wait_ms for more."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
        while len(batch) < self.batch_size:
            try:
                left = deadline - time.monotonic()
                batch.append(await asyncio.wait_for(self._queue.get(), max(left, 0)))
            except TimeoutError:
                break
        return batch

    async def _run(self, batch: list[tuple[PreparedImage, asyncio.Future]], inputs: Any) -> None:
        try:
            results = await asyncio.to_thread(self._generate, inputs)
        except Exception as exc:  # the whole batch failed (out of memory, ...)
            results = _failed(exc, len(batch))
        _settle(batch, results)

    def encode(self, images: list[Image.Image]) -> Any:
        """Model inputs for one prompt per image, on the model's device and dtype."""
        with self._tokenizer_lock:
            return self.inputs(images).to(self.device, self.dtype)

    def _encode(self, prepared: list[PreparedImage]) -> Any:
        t0 = time.perf_counter()
        inputs = self.encode([Image.open(io.BytesIO(p.data)).convert("RGB") for p in prepared])
        self.timings.update(prep_s=time.perf_counter() - t0)
        return inputs

    def _generate(self, inputs: Any) -> list[CaptionResult | CaptionFailure]:
        import torch

        t0 = time.perf_counter()
        sample = bool(self.cfg.temperature)
        with torch.inference_mode():
            out = self.vlm.generate(
                **inputs,
                max_new_tokens=self.cfg.max_output_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=None,
                top_k=None,
                repetition_penalty=self.cfg.repetition_penalty,
                pad_token_id=self.pad_id,
            )
        t1 = time.perf_counter()
        ids = inputs["input_ids"]
        new = out[:, ids.shape[1] :].tolist()
        prompt_tokens = inputs["attention_mask"].sum(1).tolist()
        with self._tokenizer_lock:  # a fast tokenizer is not to be used by two threads at once
            results = [self._result(row, int(n)) for row, n in zip(new, prompt_tokens, strict=True)]
        self.timings.update(
            generate_s=t1 - t0,
            decode_s=time.perf_counter() - t1,
            batches=1,
            images=len(new),
            image_tokens=int((ids == self.image_token_id).sum()),
            input_tokens=sum(prompt_tokens),
        )
        return results

    def _result(self, row: list[int], prompt_tokens: int) -> CaptionResult | CaptionFailure:
        """One reply: its tokens up to the first end token, read as a caption."""
        end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        output_tokens = len(row) if end is None else end + 1
        usage = Usage(prompt_tokens, output_tokens, attempts=1)
        self.timings.update(output_tokens=output_tokens)
        if end is None:
            usage.outcomes.update(requests=1, truncated=1)
            self.counters.update(usage.outcomes)
            detail = f"no end of reply within max_output_tokens={self.cfg.max_output_tokens}"
            return CaptionFailure(Reason.truncated_output, detail, usage)
        text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
        caption, as_json = read_reply(text)
        usage.outcomes.update(requests=1, **{"json" if as_json else "text_fallback": 1})
        self.counters.update(usage.outcomes)
        return CaptionResult(caption=caption, usage=usage)

    def image_tokens(self, image: PreparedImage) -> int:
        """Prompt tokens this image adds: visual tokens dominate a local VLM's prefill."""
        im = Image.open(io.BytesIO(image.data)).convert("RGB")
        return int((self.encode([im])["input_ids"] == self.image_token_id).sum())

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
        }
