"""Shared test fixtures: tiny ALBEF configs, a small word-piece vocabulary and processor, random images.

Nothing here touches the network: the tokenizer is built from a vocabulary written by the tests.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BertTokenizer

from albef_hf import AlbefConfig, AlbefImageProcessor, AlbefProcessor, AlbefTextConfig, AlbefVisionConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a an the of and is are this photo picture image dog dogs cat cats red blue green yellow circle square "
    "triangle left right above below small large big two three one there in on with what colour color shape "
    "how many yes no running sitting man woman person ##s ##ing"
).split()
VOCAB = SPECIAL_TOKENS + WORDS


def tiny_tokenizer() -> BertTokenizer:
    """A BERT tokenizer over `VOCAB` ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4)."""
    return BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})


def tiny_config(**overrides) -> AlbefConfig:
    """A tiny ALBEF: 32-px images in 8-px patches, ViT 32 x 2 layers, BERT 32 x 4 layers fused from layer 2."""
    vision = AlbefVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    text = AlbefTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        fusion_layer=2,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        cls_token_id=2,
        sep_token_id=3,
        mask_token_id=4,
    )
    return AlbefConfig(vision_config=vision, text_config=text, embed_dim=16, **overrides)


def tiny_processor(**overrides) -> AlbefProcessor:
    return AlbefProcessor(AlbefImageProcessor(size=32), tiny_tokenizer(), **overrides)


def random_images(count: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


CAPTIONS = [
    "a red circle left of a blue square",
    "two dogs running",
    "a cat sitting on the green triangle",
    "this is a photo of a man",
]


@pytest.fixture
def config() -> AlbefConfig:
    return tiny_config()


@pytest.fixture
def processor() -> AlbefProcessor:
    return tiny_processor()


@pytest.fixture
def batch(processor) -> dict[str, torch.Tensor]:
    """Four image-text pairs, processed."""
    return dict(processor(images=random_images(4), text=CAPTIONS, pairs=True))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one intra-op thread: with matrices this small, a second thread only
    spin-waits, and on a busy 2-core machine that makes the tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
