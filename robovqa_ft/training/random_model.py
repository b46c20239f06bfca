"""Models with random weights, saved in Hugging Face format: a tiny InternVL and a tiny
Qwen3-VL for the demo and the tests, and the full InternVL3-8B and Qwen3-VL-8B
architectures for the benchmarks.

Training loads them with `from_pretrained` exactly like `OpenGVLab/InternVL3-8B-hf` or
`Qwen/Qwen3-VL-8B-Instruct`: same classes, same processor, same special tokens and chat
format. The tokenizer is trained here on the run's own text, since nothing can be
downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from robovqa_ft.core.files import atomic_directory
from robovqa_ft.core.settings import TINY_TILE_PROBLEM

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS.values()]
# ChatML, as InternVL3-hf's template: an image item is "<IMG_CONTEXT>\n"; no system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ImageNet statistics, as InternVL3-hf uses (the class defaults differ).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# The published InternVL3-8B-hf config (InternViT-300M + Qwen2.5-7B), 7.94B parameters.
INTERNVL3_8B = {
    "image_size": 448,
    "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096, "patch_size": [14, 14], "attention_bias": True,
                      "layer_norm_eps": 1e-6, "layer_scale_init_value": 0.1},
    "text_config": {"model_type": "qwen2", "vocab_size": 151674, "hidden_size": 3584,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "intermediate_size": 18944, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 32768},
}  # fmt: skip
TINY = {
    "image_size": 56,
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "intermediate_size": 64, "patch_size": [14, 14]},
    "text_config": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2,
                    "intermediate_size": 128, "max_position_embeddings": 4096},
}  # fmt: skip
ARCHITECTURES = {"tiny": TINY, "internvl3-8b": INTERNVL3_8B}


def conversation_texts(jsonl_paths: Iterable[Path | str]) -> Iterator[str]:
    for path in jsonl_paths:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                for turn in json.loads(line)["conversations"]:
                    yield turn["value"]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str] = SPECIAL_TOKENS,
    extra_special_tokens: dict | None = IMAGE_TOKENS,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a family's special tokens (InternVL's by default)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        **({"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}),
    )


def build_processor(texts: Iterable[str], image_size: int, vocab_size: int) -> InternVLProcessor:
    """InternVL's processor with one tile per frame and a tokenizer trained on `texts`."""
    tokenizer = train_tokenizer(texts, vocab_size)
    size = {"height": image_size, "width": image_size}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size, crop_to_patches=False, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(
            size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        ),
        image_seq_length=(image_size // 14 // 2) ** 2,  # 14 px patches, pixel shuffle 0.5
        chat_template=CHAT_TEMPLATE,
    )


def internvl_config(
    architecture: str, processor: InternVLProcessor, image_size: int | None = None
) -> InternVLConfig:
    """`architecture` ("tiny" or "internvl3-8b") with the processor's tokens; the vocabulary
    is at least the tokenizer's, and the head is untied, as in InternVL3."""
    arch = ARCHITECTURES[architecture]
    image_size = image_size or arch["image_size"]
    tokenizer = processor.tokenizer
    vocab = max(arch["text_config"].get("vocab_size", 0), len(tokenizer))
    return InternVLConfig(
        vision_config={**arch["vision_config"], "image_size": [image_size, image_size]},
        text_config={**arch["text_config"], "vocab_size": vocab},
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
        image_seq_length=processor.image_seq_length,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def build_random_internvl(
    out_dir: Path | str,
    texts: Iterable[str],
    architecture: str = "tiny",
    image_size: int | None = None,
    vocab_size: int = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> None:
    """Save a randomly initialised InternVL, its processor and tokenizer to `out_dir`.

    The full-size architecture is built on `device` ("cuda" for the 8B: 16 GB in bf16).
    """
    torch.manual_seed(seed)
    image_size = image_size or ARCHITECTURES[architecture]["image_size"]
    processor = build_processor(texts, image_size, vocab_size)
    config = internvl_config(architecture, processor, image_size)
    save_random(out_dir, InternVLForConditionalGeneration, config, processor, dtype, device)


def save_random(
    out_dir: Path | str, model_class: type, config, processor, dtype: torch.dtype, device: str
) -> None:
    """A `model_class` of `config` with random weights, built on `device`, saved to
    `out_dir` with its processor, all or nothing."""
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def build_tiny_internvl(
    out_dir: Path | str,
    jsonl_paths: Iterable[Path | str],
    image_size: int = 56,
    vocab_size: int = 1000,
    seed: int = 0,
) -> None:
    """The demo's and the tests' tiny InternVL, its tokenizer trained on the JSONL text."""
    build_random_internvl(
        out_dir, conversation_texts(jsonl_paths), "tiny", image_size, vocab_size, seed
    )


# --- Qwen3-VL -------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
# ChatML, as Qwen3-VL-8B-Instruct's template renders these conversations: an image item is
# "<|vision_start|><|image_pad|><|vision_end|>", a video item the same with <|video_pad|>
# (the processor expands it into "<t seconds>" and the pair's tokens, a pair at a time);
# no default system prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-8B-Instruct's (pre)processor configs: mean and std, and the pixels an image, or
# a whole video, may have (a token per 32 × 32 px of a frame pair; 288 px frames fit).
QWEN_MEAN, QWEN_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
QWEN_IMAGE_PIXELS = {"shortest_edge": 65536, "longest_edge": 16777216}
QWEN_VIDEO_PIXELS = {"shortest_edge": 4096, "longest_edge": 25165824}
# The published Qwen3-VL-8B-Instruct config (its vision tower, deepstack merger, and the
# Qwen3-8B language model), the values of tests/training/fixtures/real_processors/.
QWEN3_VL_8B = {
    "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                      "num_heads": 16, "out_hidden_size": 4096, "patch_size": 16,
                      "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 2304, "hidden_act": "gelu_pytorch_tanh",
                      "deepstack_visual_indexes": [8, 16, 24]},
    "text_config": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                    "num_hidden_layers": 36, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 5000000,
                    "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
                    "rope_scaling": {"rope_type": "default", "mrope_interleaved": True,
                                     "mrope_section": [24, 20, 20]}},
}  # fmt: skip
TINY_QWEN3_VL = {
    "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                      "out_hidden_size": 64, "patch_size": 16, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "num_position_embeddings": 64,
                      "deepstack_visual_indexes": [0]},
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "max_position_embeddings": 4096,
                    "rope_scaling": {"rope_type": "default", "mrope_interleaved": True,
                                     "mrope_section": [4, 2, 2]}},
}  # fmt: skip
QWEN3_VL_ARCHITECTURES = {"tiny": TINY_QWEN3_VL, "qwen3-vl-8b": QWEN3_VL_8B}


def build_qwen3_vl_processor(texts: Iterable[str], vocab_size: int) -> Qwen3VLProcessor:
    """Qwen3-VL's processor, with the real one's sizes, and a tokenizer trained on `texts`.
    A frame's tokens follow from its stored size (frame_size): the demo stores small ones."""
    tokenizer = train_tokenizer(texts, vocab_size, QWEN_SPECIAL_TOKENS, None)
    pixels = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
              "image_mean": QWEN_MEAN, "image_std": QWEN_STD}  # fmt: skip
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels, size=QWEN_IMAGE_PIXELS),
        video_processor=Qwen3VLVideoProcessor(**pixels, size=QWEN_VIDEO_PIXELS),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def qwen3_vl_config(architecture: str, processor: Qwen3VLProcessor) -> Qwen3VLConfig:
    """`architecture` ("tiny" or "qwen3-vl-8b") with the processor's tokens; the vocabulary
    is at least the tokenizer's, and the head untied, as in Qwen3-VL-8B."""
    arch = QWEN3_VL_ARCHITECTURES[architecture]
    tokenizer = processor.tokenizer
    vocab = max(arch["text_config"].get("vocab_size", 0), len(tokenizer))
    ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}|>")
           for name in ("vision_start", "vision_end")}  # fmt: skip
    return Qwen3VLConfig(
        vision_config=arch["vision_config"],
        text_config={**arch["text_config"], "vocab_size": vocab},
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        tie_word_embeddings=False,
        **ids,
    )


def build_random_qwen3_vl(
    out_dir: Path | str,
    texts: Iterable[str],
    architecture: str = "tiny",
    vocab_size: int = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> None:
    """Save a randomly initialised Qwen3-VL, its processor and tokenizer to `out_dir`.

    The full-size architecture is built on `device` ("cuda" for the 8B: 17.5 GB in bf16).
    """
    torch.manual_seed(seed)
    processor = build_qwen3_vl_processor(texts, vocab_size)
    config = qwen3_vl_config(architecture, processor)
    save_random(out_dir, Qwen3VLForConditionalGeneration, config, processor, dtype, device)


def build_tiny_model(
    out_dir: Path | str,
    jsonl_paths: Iterable[Path | str],
    family: str = "internvl",
    image_size: int | None = None,
    vocab_size: int = 1000,
    seed: int = 0,
) -> None:
    """The demo's and the tests' tiny model of `family` ("internvl" or "qwen3_vl", the
    config's tiny_model.family), its tokenizer trained on the JSONL text. `image_size` is
    InternVL's tile (None: 56); a Qwen3-VL takes the frames at their stored size."""
    if family == "internvl":
        build_tiny_internvl(out_dir, jsonl_paths, image_size or 56, vocab_size, seed)
    elif family == "qwen3_vl":
        if image_size is not None:
            raise ValueError(TINY_TILE_PROBLEM)
        texts = conversation_texts(jsonl_paths)
        build_random_qwen3_vl(out_dir, texts, "tiny", vocab_size, seed)
    else:
        raise ValueError(f"tiny_model.family {family!r} is not internvl or qwen3_vl")
