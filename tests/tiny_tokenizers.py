"""Small tokenizers of the real classes each VLM family ships (Qwen2Tokenizer, GemmaTokenizer,
LlamaTokenizer, a Llama-3 style `tokenizers` file), with the family's real special tokens.

Nothing is downloaded: the BPE merges are trained here, on the captioning prompt itself and a
few sentences, so the ~2,400-character system prompt encodes to a few hundred tokens and the
tests stay fast. What each family's tokenizer does with special tokens (a `<bos>` it adds or
not, which token ends a turn) is the real one; the vocabulary is not.
"""

from __future__ import annotations

import json
from typing import Any

from recaption.captioners.prompt import USER_TEXT, load_prompt, prompt_with_schema

SENTENCES = [
    'A photograph of a red circle on a white background. {"caption": "a dog", "objects": []}',
    "The image shows two people walking along a beach at sunset, with waves behind them.",
    "Caption: a small house, green trees, a blue sky; 3 cars and 12 windows.",
]
BYTES = [f"<0x{i:02X}>" for i in range(256)]  # sentencepiece-style byte fallback pieces


def corpus() -> list[str]:
    return [prompt_with_schema(load_prompt("dense-v1")[1]), USER_TEXT, *SENTENCES] * 8


def _train(style: str, size: int, first: list[str]) -> tuple[dict[str, int], list[tuple]]:
    """(vocab, merges) of a BPE trained on `corpus()`, `first` taking ids 0.. in order.

    `byte`: GPT-2 byte-level symbols (Qwen, SmolLM, Llama 3). `sentencepiece`: words
    prefixed with "▁" and `<0xNN>` byte pieces for anything unseen (Gemma, Llama 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    if style == "byte":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁")
        alphabet = sorted({c for text in corpus() for c in text.replace(" ", "▁")})
        first = first + BYTES
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=first, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def qwen(extra: list[str]) -> Any:
    """Qwen2 / Qwen2.5 / Qwen3 (-VL): byte-level BPE, no BOS, ChatML turns."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train("byte", 1200, [])
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
        *extra,
    ]
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=specials,
        model_max_length=32768,
    )


def gemma3() -> Any:
    """Gemma 3: sentencepiece-style BPE that adds `<bos>`; image tokens named on the tokenizer."""
    from transformers import GemmaTokenizer

    first = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab, merges = _train("sentencepiece", 1400, first)
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        model_max_length=131072,
    )
    tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    return tokenizer


def llama2(extra: list[str]) -> Any:
    """Llama 2 (LLaVA-1.5): sentencepiece-style BPE that adds `<s>`."""
    from transformers import LlamaTokenizer

    vocab, merges = _train("sentencepiece", 1400, ["<unk>", "<s>", "</s>"])
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, legacy=False)
    tokenizer.add_tokens(extra, special_tokens=True)
    return tokenizer


def llama3(extra: list[str], bos: str, eos: str, pad: str, adds_bos: bool) -> Any:
    """A `tokenizers` file as Llama 3 and SmolLM2 ship it: byte-level BPE whose post-processor
    adds `bos` (Llama 3's `<|begin_of_text|>`) or, `adds_bos` false, nothing (SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([bos, eos, pad, *extra]))
    vocab, merges = _train("byte", 1200, specials)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    if adds_bos:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
    )
