"""GPU throughput of the `transformers` backend at a real model's size, without its weights.

A lent GPU machine reaches no hub, so this builds Qwen2.5-VL-3B-Instruct's architecture (the
dimensions of its config.json) with random bf16 weights on the GPU, saves it in the hub
layout beside the tests' Qwen tokenizer, processor and chat template (tests/tiny_vlm.py), loads
it through `TransformersCaptioner` exactly as a run does, and captions a few hundred sample
images (`recaption samples` scenes, prepared at `--max-side`) with every image in flight.

Random weights rarely pick an end token, so nearly every reply runs to `--max-output-tokens`
(~150, a dense caption's length) and is counted as cut: the throughput is the point, not the
text. Printed: images/s, output tokens/s, tokens per image, the batch size, peak GPU memory,
and the share of the wall time in preprocessing (processor: resize, patch, tokenize; it runs
in its own thread beside generate), in `generate` and in decoding replies.

    pip install -e '.[local,samples]'                       # on the GPU machine: CUDA torch
    python bench/gpu_vlm_throughput.py                      # on the GPU, ~3.8B parameters
    python bench/gpu_vlm_throughput.py --tiny --images 16   # the same path, toy size, CPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tiny_templates  # noqa: E402
import tiny_tokenizers  # noqa: E402
from tiny_vlm import Parts, save  # noqa: E402

from recaption.captioners import make_captioner  # noqa: E402
from recaption.config import load_config  # noqa: E402
from recaption.images import ImageRejected, PreparedImage, prepare  # noqa: E402
from recaption.samples import write_samples  # noqa: E402
from recaption.sources import list_shards, read_samples  # noqa: E402

# Qwen/Qwen2.5-VL-3B-Instruct, config.json
QWEN2_5_VL_3B = {
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"rope_type": "default", "mrope_section": [16, 24, 24]},
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
    "tie_word_embeddings": True,
}
# the same architecture at toy size, for a check on a CPU
TINY = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3]},
    },
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    },
    "tie_word_embeddings": True,
}


def build(out: Path, dims: dict[str, Any], device: str) -> Path:
    """Qwen2.5-VL at `dims`, random weights made on `device`, saved in the hub layout."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = tiny_tokenizers.qwen([])  # the model's vocabulary stays full size
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    config = Qwen2_5_VLConfig(
        text_config={
            **dims["text"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|endoftext|>"],
        },
        vision_config=dims["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=dims["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    parts = Parts(
        model,
        tokenizer,
        Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056),
        "Qwen2VLImageProcessor",
        "Qwen2_5_VLProcessor",
        tiny_templates.QWEN2_VL,
        {},
        ["<|im_end|>", "<|endoftext|>"],
    )
    path = save(parts, out)
    del model, parts
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def sample_images(work: Path, n: int, max_side: int) -> list[PreparedImage]:
    cfg = load_config("pipelines/local-vlm.yaml", [f"captioner.image.max_side={max_side}"])
    per_shard = 64
    write_samples(work / "shards", shards=-(-n * 10 // 9 // per_shard), per_shard=per_shard)
    images: list[PreparedImage] = []
    for shard in list_shards(str(work / "shards")):
        for sample in read_samples(shard):
            if not sample.error and len(images) < n:
                with contextlib.suppress(ImageRejected):
                    images.append(prepare(sample.image, cfg.captioner.image))
    return images


async def caption_all(captioner: Any, images: list[PreparedImage]) -> None:
    await asyncio.gather(*(captioner.caption(im) for im in images), return_exceptions=True)
    await captioner.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy size, for a CPU check")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=None, help="default: by GPU memory")
    parser.add_argument("--max-output-tokens", type=int, default=150)
    parser.add_argument("--max-side", type=int, default=448)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    work = Path(tempfile.mkdtemp(prefix="gpu-vlm-"))
    t0 = time.perf_counter()
    model = build(work / "Qwen2.5-VL-3B-random", TINY if args.tiny else QWEN2_5_VL_3B, device)
    built = time.perf_counter() - t0
    images = sample_images(work, args.images, args.max_side)
    overrides = [
        f"captioner.model_path={model}",
        f"captioner.device={device}",
        f"captioner.max_output_tokens={args.max_output_tokens}",
        f"captioner.image.max_side={args.max_side}",
    ]
    if args.batch_size:
        overrides.append(f"captioner.batch_size={args.batch_size}")
    captioner = make_captioner(load_config("pipelines/local-vlm.yaml", overrides))
    loaded = time.perf_counter() - t0 - built
    warm = images[: captioner.batch_size]
    asyncio.run(caption_all(captioner, warm))  # CUDA context, kernels, allocator
    captioner.timings.clear()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    asyncio.run(caption_all(captioner, images))
    wall = time.perf_counter() - t1
    t = captioner.timings
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "params_b": sum(p.numel() for p in captioner.vlm.parameters()) / 1e9,
        "images": t["images"],
        "batch_size": captioner.batch_size,
        "max_side": args.max_side,
        "images_per_s": t["images"] / wall,
        "output_tokens_per_s": t["output_tokens"] / wall,
        "input_tokens_per_image": t["input_tokens"] / t["images"],
        "image_tokens_per_image": t["image_tokens"] / t["images"],
        "output_tokens_per_image": t["output_tokens"] / t["images"],
        "share_prep": t["prep_s"] / wall,
        "share_generate": t["generate_s"] / wall,
        "share_decode": t["decode_s"] / wall,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0,
        "build_s": built,
        "load_s": loaded,
        "wall_s": wall,
    }
    for key, value in figures.items():
        print(f"{key:24s} {value:.3f}" if isinstance(value, float) else f"{key:24s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
