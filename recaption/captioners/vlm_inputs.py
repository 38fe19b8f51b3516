"""A local VLM's inputs, made one way for every family (Qwen2/2.5/3-VL, SmolVLM, Idefics3,
Gemma 3, LLaVA, ...): its own processor, chat template and special tokens.

- **Processor.** `AutoProcessor` also loads a video processor for Qwen-VL and SmolVLM, and
  transformers' video processors need torchvision. Without torchvision (the CPU install:
  PyPI's torchvision wheels are built against the CUDA torch) the processor is built without
  one: captions send images only, and the image processor falls back to its PIL backend.
- **Chat.** Every part of every message is a typed part (`{"type": "text", ...}`): templates
  that iterate message content as parts (Idefics3, SmolVLM, LLaVA) render a plain-string
  system message as nothing, and every template renders typed parts.
- **Special tokens once.** A template that writes `<bos>` itself (Gemma 3, Idefics3) is
  tokenized without the tokenizer's own special tokens, the others with them.
- **Batches.** Images go nested, one list per prompt: the layout every processor reads as
  "one image for each prompt" (a flat list is one prompt's images to Gemma 3 and SmolVLM).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from PIL import Image

from recaption.captioners.prompt import USER_TEXT
from recaption.errors import ConfigError

# where a checkpoint names its processor class, in the order AutoProcessor looks
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def torchvision_usable() -> bool:
    """Whether torchvision is installed; one that is installed but cannot load beside this
    torch (PyPI's CUDA-built wheel beside the CPU torch) is a config error, not a fallback:
    transformers would pick it for every image processor."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # RuntimeError: operator torchvision::nms does not exist
        import torch

        raise ConfigError(
            f"torchvision is installed but does not load beside torch {torch.__version__} "
            f"({type(exc).__name__}: {exc}): uninstall it (the transformers backend runs "
            "without it) or install the torchvision build made for this torch"
        ) from None
    return True


def processor_class(path: Path) -> type | None:
    """The processor class the checkpoint names, else its model type's; None if unknown."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import (
        PROCESSOR_MAPPING,
        processor_class_from_name,
    )

    for name in PROCESSOR_FILES:
        file = path / name
        if file.is_file() and (cls := json.loads(file.read_text()).get("processor_class")):
            return processor_class_from_name(cls)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except ValueError:  # a model type this transformers does not know: AutoProcessor says so
        return None
    return PROCESSOR_MAPPING.get(type(config))


def images_only(cls: type) -> type:
    """`cls` without its video processor: the processor loads and runs with no torchvision."""
    attributes = cls.get_attributes()
    slot = attributes.index("video_processor")
    kept = [a for a in attributes if a != "video_processor"]

    class ImagesOnly(cls):
        @classmethod
        def get_attributes(klass) -> list[str]:
            return kept

        # `__init__` still takes video_processor: pass None there. transformers < 5.25 builds
        # the processor from positional sub-processors, 5.25 and later from one dict.
        @classmethod
        def from_args_and_dict(klass, args: list, processor_dict: dict, **kwargs: Any) -> Any:
            processor_dict = {k: v for k, v in processor_dict.items() if k != "video_processor"}
            return super().from_args_and_dict(
                [*args[:slot], None, *args[slot:]], processor_dict, **kwargs
            )

        @classmethod
        def from_dict(klass, processor_dict: dict, **kwargs: Any) -> Any:
            return super().from_dict({**processor_dict, "video_processor": None}, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__
    return ImagesOnly


def load_processor(path: Path) -> Any:
    from transformers import AutoProcessor

    cls = None if torchvision_usable() else processor_class(path)
    if cls is not None and "video_processor" in cls.get_attributes():
        return images_only(cls).from_pretrained(path, local_files_only=True)
    return AutoProcessor.from_pretrained(path, local_files_only=True)


def chat(system: str) -> list[dict[str, Any]]:
    """The conversation for one image: system prompt, then the image and the user text."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER_TEXT}]},
    ]


def render(processor: Any, tokenizer: Any, system: str) -> str:
    """The prompt text through the model's own template (the processor's, else the
    tokenizer's), rendered by the tokenizer: processors such as SmolVLM's read video
    settings in their own `apply_chat_template`."""
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()), None)
    if not template:
        raise ConfigError("the model directory has no chat template (chat_template.json)")
    return tokenizer.apply_chat_template(
        chat(system), chat_template=template, add_generation_prompt=True, tokenize=False
    )


def adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens to `text`: not when the template
    already wrote them (Gemma 3's and Idefics3's `<bos>`), which would double them."""
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    extra = len(full) - len(bare)
    if extra <= 0:
        return True
    start = next((i for i in range(extra + 1) if full[i : i + len(bare)] == bare), 0)
    head, tail = full[:start], full[start + len(bare) :]
    doubled = bool(head) and bare[: len(head)] == head
    doubled = doubled or (bool(tail) and bare[-len(tail) :] == tail)
    return not doubled


class Inputs:
    """A family's processor with the prompt fixed: images in, model inputs out."""

    def __init__(self, path: Path, system: str):
        self.processor = load_processor(path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        self.text = render(self.processor, self.tokenizer, system)
        self.add_special_tokens = adds_special_tokens(self.tokenizer, self.text)

    def __call__(self, images: list[Image.Image]) -> Any:
        """One prompt per image, left-padded: a BatchFeature of PyTorch tensors."""
        return self.processor(
            text=[self.text] * len(images),
            images=[[im] for im in images],
            padding=True,
            add_special_tokens=self.add_special_tokens,
            return_tensors="pt",
        )

    def text_tokens(self) -> int:
        """The prompt's tokens before image placeholders expand."""
        ids = self.tokenizer(self.text, add_special_tokens=self.add_special_tokens)["input_ids"]
        return len(ids)
