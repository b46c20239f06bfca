"""A tiny InternVL for the demo and the tests, saved in Hugging Face format.

Training loads it with `from_pretrained` exactly like `OpenGVLab/InternVL3-8B-hf`: same
classes, same processor, same special tokens and chat format; only the sizes differ
(a 56 px tile gives 4 image tokens instead of 256) and the tokenizer is trained here
on the run's own text, since nothing can be downloaded.
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
)

from robovqa_ft.files import atomic_directory

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


def conversation_texts(jsonl_paths: Iterable[Path | str]) -> Iterator[str]:
    for path in jsonl_paths:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                for turn in json.loads(line)["conversations"]:
                    yield turn["value"]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the special tokens InternVL needs."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=IMAGE_TOKENS,
    )


def build_tiny_internvl(
    out_dir: Path | str,
    jsonl_paths: Iterable[Path | str],
    image_size: int = 56,
    vocab_size: int = 1000,
    seed: int = 0,
) -> None:
    """Save a randomly initialised tiny InternVL, its processor and tokenizer to `out_dir`."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(conversation_texts(jsonl_paths), vocab_size)
    tokens_per_tile = (image_size // 14 // 2) ** 2  # 14 px patches, then pixel shuffle 0.5
    size = {"height": image_size, "width": image_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size, crop_to_patches=False, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(
            size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        ),
        image_seq_length=tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": [image_size, image_size],
            "patch_size": [14, 14],
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 4096,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
