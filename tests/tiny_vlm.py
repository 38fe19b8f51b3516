"""Tiny, randomly initialised checkpoints of the VLM families people caption with, each saved
in its hub layout: config.json + safetensors, generation_config.json, the family's tokenizer
class with its special tokens (tokenizer.json, tokenizer_config.json), its image processor
(preprocessor_config.json, under the hub's class name), its chat template (chat_template.json)
and processor settings (processor_config.json).

Nothing is downloaded: configs are the real architectures at toy sizes, the tokenizers are
trained here (tiny_tokenizers.py) and the templates are the hub's (tiny_templates.py). Replies
are noise (ended after a full stop: `_end_after_full_stop`); the tests assert structure and
accounting, not content.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiny_templates as templates
import tiny_tokenizers as tokenizers


@dataclass(frozen=True)
class Scale:
    """Toy dimensions: `TEST` for the tests; bench/ scales the language model up so that
    generation takes the share of time it has in a real model."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TEST = Scale()


@dataclass
class Parts:
    """What one family builder makes; `save` writes it in the hub layout."""

    model: Any
    tokenizer: Any
    image_processor: Any
    image_processor_type: str  # the class name hub checkpoints carry
    processor_class: str
    template: str
    processor: dict[str, Any]  # processor_config.json, beside processor_class
    end: list[str]  # tokens that end a reply (generation_config.eos_token_id)


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _llama_text(s: Scale, tokenizer: Any, end: str, pad: str) -> dict[str, Any]:
    eos, pad_id = _ids(tokenizer, end, pad)
    return {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": s.hidden,
        "intermediate_size": 2 * s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "eos_token_id": eos,
        "pad_token_id": pad_id,
    }


def _qwen_text(s: Scale, tokenizer: Any, sections: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": s.hidden,
        "intermediate_size": 2 * s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": 32768,
        "rope_scaling": {"rope_type": "default", "mrope_section": sections},
        "bos_token_id": _ids(tokenizer, "<|endoftext|>")[0],
        "eos_token_id": _ids(tokenizer, "<|im_end|>")[0],
        "pad_token_id": _ids(tokenizer, "<|endoftext|>")[0],
        **extra,
    }


def _qwen_ids(tokenizer: Any) -> dict[str, int]:
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    keys = ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"]
    return dict(zip(keys, _ids(tokenizer, *names), strict=True))


def _mrope(s: Scale) -> list[int]:
    """Qwen's multimodal RoPE sections (temporal, height, width): they add up to head_dim / 2."""
    half = s.head_dim // 2
    return [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]


def qwen2_vl(s: Scale) -> Parts:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = tokenizers.qwen([])
    config = Qwen2VLConfig(
        text_config=_qwen_text(s, tokenizer, _mrope(s)),
        vision_config={
            "depth": s.vision_layers,
            "embed_dim": s.vision_hidden,
            "hidden_size": s.hidden,
            "mlp_ratio": 2,
            "num_heads": 2,
        },
        **_qwen_ids(tokenizer),
    )
    return Parts(
        Qwen2VLForConditionalGeneration(config),
        tokenizer,
        Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
        "Qwen2VLImageProcessor",
        "Qwen2VLProcessor",
        templates.QWEN2_VL,
        {},
        ["<|im_end|>", "<|endoftext|>"],
    )


def qwen2_5_vl(s: Scale) -> Parts:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = tokenizers.qwen([])
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(s, tokenizer, _mrope(s)),
        vision_config={
            "depth": s.vision_layers,
            "hidden_size": s.vision_hidden,
            "intermediate_size": 2 * s.vision_hidden,
            "num_heads": 2,
            "out_hidden_size": s.hidden,
            "window_size": 112,
            "fullatt_block_indexes": [s.vision_layers - 1],
        },
        **_qwen_ids(tokenizer),
    )
    return Parts(
        Qwen2_5_VLForConditionalGeneration(config),
        tokenizer,
        Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056),
        "Qwen2VLImageProcessor",
        "Qwen2_5_VLProcessor",
        templates.QWEN2_VL,
        {},
        ["<|im_end|>", "<|endoftext|>"],
    )


def qwen3_vl(s: Scale) -> Parts:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = tokenizers.qwen(["<tool_call>", "</tool_call>", "<think>", "</think>"])
    sections = _mrope(s)
    text = _qwen_text(s, tokenizer, sections, head_dim=s.head_dim)
    text["rope_scaling"] = {
        "rope_type": "default",
        "mrope_section": sections,
        "mrope_interleaved": True,
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config={
            "depth": s.vision_layers,
            "hidden_size": s.vision_hidden,
            "intermediate_size": 2 * s.vision_hidden,
            "num_heads": 2,
            "out_hidden_size": s.hidden,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0],
        },
        **_qwen_ids(tokenizer),
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        size={"shortest_edge": 65536, "longest_edge": 16777216},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Parts(
        Qwen3VLForConditionalGeneration(config),
        tokenizer,
        image_processor,
        "Qwen2VLImageProcessorFast",
        "Qwen3VLProcessor",
        templates.QWEN3_VL,
        {},
        ["<|im_end|>", "<|endoftext|>"],
    )


IDEFICS_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]


def _siglip(s: Scale, image_size: int, patch: int) -> dict[str, Any]:
    return {
        "hidden_size": s.vision_hidden,
        "intermediate_size": 2 * s.vision_hidden,
        "num_hidden_layers": s.vision_layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
    }


def idefics3(s: Scale) -> Parts:
    """Idefics3-8B-Llama3's layout: its tokenizer adds `<|begin_of_text|>`, so does its template."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    tokenizer = tokenizers.llama3(
        [*IDEFICS_TOKENS, "<|end_of_text|>"],
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|reserved_special_token_0|>",
        adds_bos=True,
    )
    side, patch, scale = 64, 8, 2  # (64 / 8)^2 patches / 2^2 = 16 tokens per tile
    config = Idefics3Config(
        vision_config=_siglip(s, side, patch),
        text_config=_llama_text(s, tokenizer, "<end_of_utterance>", "<|reserved_special_token_0|>"),
        scale_factor=scale,
        image_token_id=_ids(tokenizer, "<image>")[0],
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side}
    )
    return Parts(
        Idefics3ForConditionalGeneration(config),
        tokenizer,
        image_processor,
        "Idefics3ImageProcessor",
        "Idefics3Processor",
        templates.IDEFICS3,
        {"image_seq_len": (side // patch) ** 2 // scale**2},
        ["<end_of_utterance>", "<|end_of_text|>"],
    )


def smolvlm2(s: Scale) -> Parts:
    """SmolVLM2's layout: SmolLM2's tokenizer (no BOS added), image and video processors."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    tokenizer = tokenizers.llama3(
        [*IDEFICS_TOKENS, "<video>", "<|endoftext|>"],
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        adds_bos=False,
    )
    side, patch, scale = 64, 8, 2
    config = SmolVLMConfig(
        vision_config=_siglip(s, side, patch),
        text_config=_llama_text(s, tokenizer, "<end_of_utterance>", "<|im_end|>"),
        scale_factor=scale,
        image_token_id=_ids(tokenizer, "<image>")[0],
    )
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side}
    )
    return Parts(
        SmolVLMForConditionalGeneration(config),
        tokenizer,
        image_processor,
        "SmolVLMImageProcessor",
        "SmolVLMProcessor",
        templates.SMOLVLM2,
        {"image_seq_len": (side // patch) ** 2 // scale**2},
        ["<end_of_utterance>"],
    )


def gemma3(s: Scale) -> Parts:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = tokenizers.gemma3()
    side, patch, tokens = 64, 8, 16  # 8x8 patches pooled to 4x4
    boi, eoi, image, pad, eos, bos = _ids(
        tokenizer,
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
        "<pad>",
        "<eos>",
        "<bos>",
    )
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": s.hidden,
            "intermediate_size": 2 * s.hidden,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "query_pre_attn_scalar": s.head_dim,
            "sliding_window": 512,
            "pad_token_id": pad,
            "eos_token_id": eos,
            "bos_token_id": bos,
        },
        tie_word_embeddings=False,  # the hub's ties them: see _end_after_full_stop
        vision_config={"model_type": "siglip_vision_model", **_siglip(s, side, patch)},
        mm_tokens_per_image=tokens,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return Parts(
        Gemma3ForConditionalGeneration(config),
        tokenizer,
        image_processor,
        "Gemma3ImageProcessor",
        "Gemma3Processor",
        templates.GEMMA3,
        {"image_seq_length": tokens},
        ["<eos>", "<end_of_turn>"],
    )


def llava(s: Scale) -> Parts:
    """LLaVA-1.5's layout: CLIP vision tower, Llama 2 tokenizer (adds `<s>`)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tokenizers.llama2(["<image>", "<pad>"])
    tokenizer.pad_token = "<pad>"
    side, patch = 32, 8  # 4x4 patches = 16 image tokens (CLIP's class token dropped)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            **_siglip(s, side, patch),
        },
        text_config=_llama_text(s, tokenizer, "</s>", "<pad>"),
        image_token_index=_ids(tokenizer, "<image>")[0],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(side // patch) ** 2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return Parts(
        LlavaForConditionalGeneration(config),
        tokenizer,
        image_processor,
        "CLIPImageProcessor",
        "LlavaProcessor",
        templates.LLAVA,
        {
            "patch_size": patch,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
        ["</s>"],
    )


FAMILIES: dict[str, Callable[[Scale], Parts]] = {
    "llava": llava,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "idefics3": idefics3,
    "smolvlm2": smolvlm2,
    "gemma3": gemma3,
}


def _end_after_full_stop(model: Any, tokenizer: Any, end: list[str]) -> None:
    """Plant one habit in the random weights: "." is likely (its output row scaled up) and
    the token after it ends the reply (the end tokens' output rows point along the input
    embedding of ".", scaled up so that it, not the layers' noise, dominates the next step).
    Greedy decoding then ends replies after a full stop within a few dozen tokens, as
    validation asks of a caption, instead of running to the token budget."""
    import torch

    dot = _ids(tokenizer, ".")[0]
    with torch.no_grad():
        out = model.get_output_embeddings().weight
        typical = out.norm(dim=1).mean()
        out[dot] *= 3
        along = model.get_input_embeddings().weight[dot]
        along *= 16
        out[_ids(tokenizer, *end)] = along / along.norm() * typical * 1.5


def save(parts: Parts, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    end_ids = _ids(parts.tokenizer, *parts.end)
    generation = parts.model.generation_config
    generation.eos_token_id = end_ids if len(end_ids) > 1 else end_ids[0]
    generation.pad_token_id = parts.tokenizer.pad_token_id
    generation.bos_token_id = parts.tokenizer.bos_token_id
    parts.model.save_pretrained(out)
    parts.tokenizer.save_pretrained(out)
    parts.image_processor.save_pretrained(out)
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    preprocessor |= {
        "image_processor_type": parts.image_processor_type,
        "processor_class": parts.processor_class,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": parts.template}))
    processor = {"processor_class": parts.processor_class, **parts.processor}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out


def build_tiny_vlm(out: Path, family: str = "llava", scale: Scale = TEST, seed: int = 0) -> Path:
    """Build `family` at `scale` with random weights and save it to `out`."""
    import torch

    torch.manual_seed(seed)
    parts = FAMILIES[family](scale)
    _end_after_full_stop(parts.model, parts.tokenizer, parts.end)
    return save(parts, out)
