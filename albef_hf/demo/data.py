"""The demo's data: the synthetic world's vocabulary as a BERT tokenizer, and its training pairs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import PIL.Image
from torch.utils.data import Dataset
from transformers import BertTokenizer

from ..data.synthetic import (
    SyntheticDataset,
    SyntheticWorldConfig,
    caption_sample,
    grounding_sample,
    nlvr_sample,
    ve_sample,
    vqa_answer_list,
    vqa_sample,
)
from ..data.synthetic.config import NUMBER_WORDS, POSITION_NAMES, RELATION_PHRASES, SIZE_WORDS, plural
from ..processing_albef import pre_caption, pre_question

__all__ = ["SPECIAL_TOKENS", "SyntheticPairs", "synthetic_tokenizer", "synthetic_vocabulary"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _world_texts(config: SyntheticWorldConfig, seed: int, samples: int) -> Iterable[str]:
    # the word lists the templates combine, so that no rare combination is missed ...
    yield " ".join(NUMBER_WORDS)
    yield " ".join(word for words in SIZE_WORDS.values() for word in words)
    yield " ".join(RELATION_PHRASES.values())
    yield " ".join(name for row in POSITION_NAMES[config.grid_size] for name in row)
    yield " ".join(config.colour_names)
    yield " ".join(f"{shape} {plural(shape)}" for shape in config.shapes)
    # ... and samples of every task for the templates' own words
    for index in range(samples):
        yield from caption_sample(config, seed, "train", index).captions
        vqa = vqa_sample(config, seed, "train", index)
        yield pre_question(vqa.question)
        yield from vqa.answers
        yield nlvr_sample(config, seed, "train", index).sentence
        yield ve_sample(config, seed, "train", index).hypothesis
        yield grounding_sample(config, seed, "train", index).text
    yield from vqa_answer_list(config)


def synthetic_vocabulary(config: SyntheticWorldConfig, seed: int = 0, samples: int = 300) -> list[str]:
    """Every word the world's texts use (captions, questions, answers, statements, hypotheses, referring
    expressions), after the original caption cleaning, sorted; the special tokens come first.

    The world's language combines fixed word lists (numbers, sizes, colours, shapes, positions, relations),
    taken whole, in fixed templates, whose words a few hundred samples of each task cover.
    """
    counts = Counter(
        word for text in _world_texts(config, seed, samples) for word in pre_caption(text).split()
    )
    return [*SPECIAL_TOKENS, *sorted(counts)]


def synthetic_tokenizer(config: SyntheticWorldConfig, seed: int = 0) -> BertTokenizer:
    """A word-level BERT tokenizer over `synthetic_vocabulary` ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4)."""
    vocabulary = synthetic_vocabulary(config, seed)
    return BertTokenizer(vocab={token: index for index, token in enumerate(vocabulary)})


class SyntheticPairs(Dataset):
    """Image-caption pairs of the world's training split: a caption-per-item view of
    `SyntheticDataset("caption", "train", ...)`, rendered on first access.

    Item `k` is caption `k % C` of training image `k // C` (`C` captions per image), as a reader sample
    `{"image": PIL, "text": str, "image_id": int}`; a fraction `config.noisy_caption_fraction` of the captions
    is wrong or unrelated, as web captions are.

    With `cache` (the default) each image and its captions are generated once and kept (about 17 kB per 64-px
    image: 175 MiB for the demo's 10,000, measured), instead of once per caption: the demo's 1000 steps of 64
    pairs read each image 6.4 times, and generating a scene, its captions and its pixels was a tenth of a bf16
    step. The rows are the same either way (the world is a function of the seed and the index); with the cache
    every read of an image returns the same PIL object, so a transform must not draw on it in place.
    """

    def __init__(
        self, config: SyntheticWorldConfig, num_images: int, seed: int = 0, cache: bool = True
    ) -> None:
        self.images = SyntheticDataset("caption", "train", num_images, seed, config)
        self.captions_per_image = config.captions_per_image
        self._rows: dict[int, tuple[PIL.Image.Image, tuple[str, ...]]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.images) * self.captions_per_image

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        image_index, caption = divmod(index, self.captions_per_image)
        kept = self._rows.get(image_index) if self._rows is not None else None
        if kept is None:
            row = self.images[image_index]
            kept = row["image"], tuple(row["captions"])
            if self._rows is not None:
                self._rows[image_index] = kept
        image, captions = kept
        return {"image": image, "text": captions[caption], "image_id": image_index}
