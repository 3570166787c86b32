"""Collators that turn reader samples into ALBEF training batches, and sample keys for exact resumption.

A reader sample is `{"image": PIL.Image, "text": str, "image_id": int, ...}` (see `albef_hf.data.readers`).

- `AlbefPretrainingCollator`: training transform, tokenisation (`AlbefProcessor`), MLM masking 80/10/10
  that never masks special or padding tokens -> `pixel_values, input_ids, attention_mask, mlm_input_ids,
  mlm_labels`.
- `AlbefRetrievalCollator`: training transform and tokenisation -> `pixel_values, input_ids,
  attention_mask, idx` (the image ids that define positives in retrieval fine-tuning; also grounding
  fine-tuning, which the original trains as retrieval on image ids).
- `AlbefImageTextCollator`: transform and tokenisation only -> `pixel_values, input_ids, attention_mask`
  (NLVR2's text-assignment step; the base of the others).
- `AlbefClassificationCollator`: one image (SNLI-VE) or an image pair (NLVR2, `images_per_sample=2`), a
  sentence and a label -> `pixel_values` (`(B, 3, H, W)` or `(B, 2, 3, H, W)`), `input_ids`,
  `attention_mask`, `labels`.
- `AlbefVqaCollator`: questions (cleaned with `pre_question`) and their weighted answers -> the batch keys
  of `AlbefForQuestionAnswering` (see the class).

The downstream samples (`albef_hf.data.downstream` reads them) keep the reader form: the sentence,
hypothesis or question is `"text"`; an image pair is `"images": [first, second]`.

Randomness
----------
The augmentation and the MLM mask of a sample are drawn from a generator seeded by
`(seed, epoch, dataset index)` when the sample carries a `"sample_key": (epoch, index)`, which
`KeyedDataset` + `EpochKeyedSampler` add (`AlbefTrainer` installs them for map-style datasets). A sample's
draws then do not depend on the batch it lands in, on DataLoader workers or prefetching, or on the number
of processes, so a run resumed from a checkpoint draws exactly what the uninterrupted run drew. Samples
without a key (iterable datasets, plain DataLoaders) draw from a per-process stream seeded by
`(torch.initial_seed(), seed)`, which differs between DataLoader workers.

Bad samples
-----------
Readers already skip unreadable images and empty captions. A collator still checks every sample (an image
it can read and transform, a caption that is not empty after normalisation, an image id for retrieval); a
bad one is replaced by a good sample of the same batch, so that the batch keeps its size (the feature
queues and the cross-process gather rely on it), counted in `num_skipped` and logged. The count lives in
shared memory (a reader's `SkipStats`), so that replacements made in DataLoader worker processes are
counted too. A batch without any good sample raises a `ValueError` that says why.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, Sampler

from ..image_processing_albef import to_pil_rgb
from ..losses import mask_tokens
from .readers import SkipStats
from .transforms import RandomTransform

__all__ = [
    "SAMPLE_KEY",
    "AlbefClassificationCollator",
    "AlbefImageTextCollator",
    "AlbefPretrainingCollator",
    "AlbefRetrievalCollator",
    "AlbefVqaCollator",
    "EpochKeyedSampler",
    "KeyedDataset",
    "vqa_answer_weights",
]

logger = logging.getLogger(__name__)

#: Sample field holding `(epoch, dataset index)`, which seeds the sample's augmentation and masking.
SAMPLE_KEY = "sample_key"
# The one reason a collator counts: a bad sample it replaced by another of its batch.
_REPLACED = "bad_sample"
_MAX_SEED = 2**63 - 1


class EpochKeyedSampler(Sampler[int]):
    """Sampler of `KeyedDataset` keys: yields `epoch * num_samples + index` for a permutation of the indices.

    The permutation is drawn from `torch.Generator().manual_seed(seed + epoch)`, so it is the same in every
    process (accelerate splits the batches among them) and after a resume. `set_epoch` selects the epoch
    (the Trainer calls it).

    Args:
        num_samples: length of the dataset.
        seed: seed of the shuffling.
        shuffle: permute the indices (else sequential order).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(
                self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
        else:
            order = torch.arange(self.num_samples)
        offset = self.epoch * self.num_samples
        return iter((order + offset).tolist())

    def __len__(self) -> int:
        return self.num_samples


class KeyedDataset(Dataset):
    """Wraps a map-style dataset of dict samples so that each sample carries `sample_key = (epoch, index)`.

    Indexed by the keys `EpochKeyedSampler` yields (`epoch * len(dataset) + index`); plain indices below the
    length are epoch 0. Attributes of the wrapped dataset (such as a reader's `skip_stats`) stay reachable.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), len(self.dataset))
        sample = self.dataset[index]
        if isinstance(sample, dict):
            sample = {**sample, SAMPLE_KEY: (epoch, index)}
        return sample

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.dataset, name)


class AlbefImageTextCollator:
    """Image-text batches: training transform and tokenisation; the base of the other collators.

    Args:
        processor: an `AlbefProcessor` (text normalisation, tokenisation, image normalisation).
        transform: training transform applied to each PIL image before the processor (e.g.
            `build_train_transform(256, "finetune")`); a `RandomTransform` draws from the sample's generator.
        max_length: longest text in tokens; default: the processor's.
        seed: seed of the per-sample generators (`AlbefTrainer` sets the run's data seed when None).

    Returns (from `__call__`):
        `pixel_values (B, 3, H, W)`, `input_ids`, `attention_mask` `(B, L)`: caption i describes image i.
    """

    #: Images per sample: 1 reads `"image"`, more read the list `"images"`.
    images_per_sample: int = 1

    def __init__(
        self,
        processor: Any,
        transform: Callable[..., PIL.Image.Image] | None = None,
        max_length: int | None = None,
        seed: int | None = None,
    ) -> None:
        if processor is None or not hasattr(processor, "tokenize"):
            raise TypeError("the collator needs an AlbefProcessor (it tokenises and normalises the images)")
        self.processor = processor
        self.transform = transform
        self.max_length = max_length
        self.seed = seed
        self.skip_stats = SkipStats(type(self).__name__, reasons=(_REPLACED,))
        self._stream: np.random.Generator | None = None
        self._stream_key: tuple[int, int] | None = None

    def __call__(self, samples: Iterable[Any]) -> dict[str, torch.Tensor]:
        return self._collate(samples)[0]

    @property
    def num_skipped(self) -> int:
        """Bad samples replaced so far, in this process and its DataLoader workers."""
        return self.skip_stats.total

    def for_evaluation(self) -> AlbefImageTextCollator:
        """A copy without the training transform (the processor's resize only), for evaluation batches."""
        evaluation = copy.copy(self)
        evaluation.transform = None
        evaluation.skip_stats = SkipStats(self.skip_stats.name, reasons=(_REPLACED,))
        return evaluation

    def text_normalization(self) -> str | None:
        """How texts are cleaned: "default" is the processor's own setting (`pre_caption` by default)."""
        return "default"

    # -- randomness --------------------------------------------------------------------------------

    def _sample_seeds(self, sample: dict[str, Any]) -> tuple[int, int]:
        """(transform seed, mask seed) of a sample: from its key when it has one, else from the stream."""
        key = sample.get(SAMPLE_KEY)
        seed = self.seed or 0
        if key is not None:
            epoch, index = key
            state = np.random.SeedSequence([seed, int(epoch), int(index)]).generate_state(2, dtype=np.uint64)
            return int(state[0]) & _MAX_SEED, int(state[1]) & _MAX_SEED
        process = (os.getpid(), torch.initial_seed())
        if self._stream is None or self._stream_key != process:
            # re-created per process: DataLoader workers get distinct torch seeds, hence distinct streams
            self._stream = np.random.default_rng([process[1], seed])
            self._stream_key = process
        drawn = self._stream.integers(0, _MAX_SEED, size=2, dtype=np.int64)
        return int(drawn[0]), int(drawn[1])

    # -- validation ----------------------------------------------------------------------------------

    def _prepare(self, sample: Any, transform_seed: int) -> tuple[list[PIL.Image.Image], str] | str:
        """(transformed images, normalised text) or the reason why the sample is bad."""
        if not isinstance(sample, dict):
            return f"not a dict sample ({type(sample).__name__})"
        text = sample.get("text")
        if not isinstance(text, str):
            return f"no caption (text={text!r})"
        cleaned = self.processor.normalize([text], self.text_normalization())[0]
        if not cleaned.strip():
            return f"empty caption after normalisation ({text!r})"
        reason = self._check_extra(sample)
        if reason:
            return reason
        images = self._images_of(sample)
        if isinstance(images, str):
            return images
        try:
            # image k > 0 of a sample gets its own stream, so image 0 draws as a one-image sample does
            return [
                self._transform(to_pil_rgb(image), [transform_seed, k] if k else transform_seed)
                for k, image in enumerate(images)
            ], cleaned
        except (OSError, ValueError, SyntaxError, EOFError, TypeError) as error:
            return f"unusable image ({error})"

    def _images_of(self, sample: dict[str, Any]) -> list[Any] | str:
        if self.images_per_sample == 1:
            return [sample.get("image")]
        images = sample.get("images")
        if (
            not isinstance(images, Sequence)
            or isinstance(images, str)
            or len(images) != self.images_per_sample
        ):
            return f"needs {self.images_per_sample} images in 'images', got {type(images).__name__}"
        return list(images)

    def _transform(self, image: PIL.Image.Image, seed: int | list[int]) -> PIL.Image.Image:
        if self.transform is None:
            return image
        if isinstance(self.transform, RandomTransform):
            return self.transform(image, rng=np.random.default_rng(seed))
        return self.transform(image)

    def _check_extra(self, sample: dict[str, Any]) -> str | None:
        return None

    def _skip(self, reason: str) -> None:
        self.skip_stats.record(_REPLACED, f"{reason}; replaced by another sample of its batch")

    def _collate(
        self, samples: Iterable[Any]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[int]]:
        if isinstance(samples, (str, bytes, dict)) or not isinstance(samples, Iterable):
            raise TypeError(f"a collator takes a list of samples (dicts), got {type(samples).__name__}")
        samples = list(samples)
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        seeds = [self._sample_seeds(s) if isinstance(s, dict) else (0, 0) for s in samples]
        prepared = [self._prepare(sample, seed[0]) for sample, seed in zip(samples, seeds, strict=True)]
        good = [i for i, item in enumerate(prepared) if not isinstance(item, str)]
        if not good:
            reasons = sorted({item for item in prepared if isinstance(item, str)})
            raise ValueError(f"no usable sample in a batch of {len(samples)}: {reasons[:3]}")
        chosen = []
        for position, item in enumerate(prepared):
            if isinstance(item, str):
                self._skip(item)
                # the next good sample, cyclically: keeps the batch size, and the choice is deterministic
                position = next((g for g in good if g > position), good[0])
            chosen.append(position)
        images = [image for i in chosen for image in prepared[i][0]]
        texts = [prepared[i][1] for i in chosen]
        batch = dict(
            self.processor(
                images=images,
                text=texts,
                max_length=self.max_length,
                text_normalization=None,  # `_prepare` normalised the texts
            )
        )
        if self.images_per_sample > 1:
            batch["pixel_values"] = batch["pixel_values"].unflatten(0, (len(chosen), self.images_per_sample))
        return batch, [samples[i] for i in chosen], [seeds[i][1] for i in chosen]


class AlbefPretrainingCollator(AlbefImageTextCollator):
    """Pretraining batches: transformed images, tokenised captions and MLM masks.

    Args:
        processor: an `AlbefProcessor` (caption normalisation, tokenisation, image normalisation).
        transform: training transform applied to each PIL image before the processor (e.g.
            `build_train_transform(256, "pretrain")`); a `RandomTransform` draws from the sample's generator.
        max_length: longest text in tokens (the original pretraining uses 25); default: the processor's.
        mlm_probability: probability of selecting a token for MLM; default: the model config's (set by
            `AlbefTrainer`), else 0.15.
        vocab_size: random replacement tokens are drawn below it; set it to the model's
            `config.text_config.vocab_size` (`AlbefTrainer` does when it is None); default: the tokenizer's.
        special_token_ids: ids never masked; default: all the tokenizer's special ids ([PAD], [CLS], [SEP],
            [MASK], [UNK]) -- with `original_tokenization` there is no [SEP] to protect.
        seed: seed of the per-sample generators (`AlbefTrainer` sets the run's data seed when None).

    Returns (from `__call__`):
        `pixel_values (B, 3, H, W)`, `input_ids`, `attention_mask`, `mlm_input_ids`, `mlm_labels` `(B, L)`;
        `mlm_labels` holds the original id at masked positions and -100 elsewhere.
    """

    def __init__(
        self,
        processor: Any,
        transform: Callable[..., PIL.Image.Image] | None = None,
        max_length: int | None = None,
        mlm_probability: float | None = None,
        vocab_size: int | None = None,
        special_token_ids: Iterable[int] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(processor, transform, max_length, seed)
        tokenizer = processor.tokenizer
        if tokenizer.mask_token_id is None:
            raise ValueError("MLM needs a tokenizer with a [MASK] token")
        if mlm_probability is not None and not 0.0 <= mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must lie in [0, 1], got {mlm_probability}")
        self.mlm_probability = mlm_probability
        self.vocab_size = vocab_size
        self.mask_token_id = tokenizer.mask_token_id
        self.special_token_ids = tuple(
            special_token_ids if special_token_ids is not None else tokenizer.all_special_ids
        )

    def __call__(self, samples: Iterable[Any]) -> dict[str, torch.Tensor]:
        batch, _, mask_seeds = self._collate(samples)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        vocab_size = self.vocab_size or len(self.processor.tokenizer)
        probability = 0.15 if self.mlm_probability is None else self.mlm_probability
        mlm_input_ids = input_ids.clone()
        mlm_labels = torch.full_like(input_ids, -100)
        for row, seed in enumerate(mask_seeds):
            # drawn over the unpadded tokens only, so a sample's mask does not depend on its batch
            length = int(attention_mask[row].sum())
            masked, labels = mask_tokens(
                input_ids[row : row + 1, :length],
                vocab_size,
                self.mask_token_id,
                self.special_token_ids,
                probability,
                generator=torch.Generator().manual_seed(seed),
            )
            mlm_input_ids[row, :length] = masked[0]
            mlm_labels[row, :length] = labels[0]
        batch["mlm_input_ids"] = mlm_input_ids
        batch["mlm_labels"] = mlm_labels
        return batch


class AlbefRetrievalCollator(AlbefImageTextCollator):
    """Retrieval fine-tuning batches: transformed images, tokenised captions and image ids.

    Args:
        processor, transform, max_length, seed: as in `AlbefPretrainingCollator`.

    Returns (from `__call__`):
        `pixel_values`, `input_ids`, `attention_mask` and `idx` `(B,)` int64 image ids.
    """

    def _check_extra(self, sample: dict[str, Any]) -> str | None:
        image_id = sample.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            return f"no integer image_id ({image_id!r})"
        return None

    def __call__(self, samples: Iterable[Any]) -> dict[str, torch.Tensor]:
        batch, chosen, _ = self._collate(samples)
        batch["idx"] = torch.tensor([int(sample["image_id"]) for sample in chosen], dtype=torch.long)
        return batch


class AlbefClassificationCollator(AlbefImageTextCollator):
    """SNLI-VE and NLVR2 batches: an image (or an image pair), a sentence about it, and a class label.

    Samples: `{"image", "text", "label"}`, or `{"images": [first, second], "text", "label"}` with
    `images_per_sample=2` (NLVR2: each image gets its own augmentation draw).

    Args:
        processor, transform, max_length, seed: as in `AlbefImageTextCollator`.
        images_per_sample: 1 (SNLI-VE) or 2 (NLVR2).
        num_labels: labels must lie in `[0, num_labels)` (default: not checked); a sample with another label is
            replaced like any bad sample.

    Returns (from `__call__`):
        `pixel_values` `(B, 3, H, W)` or `(B, 2, 3, H, W)`, `input_ids`, `attention_mask`, and `labels` `(B,)`.
    """

    def __init__(
        self,
        processor: Any,
        transform: Callable[..., PIL.Image.Image] | None = None,
        max_length: int | None = None,
        seed: int | None = None,
        images_per_sample: int = 1,
        num_labels: int | None = None,
    ) -> None:
        super().__init__(processor, transform, max_length, seed)
        if images_per_sample < 1:
            raise ValueError(f"images_per_sample must be at least 1, got {images_per_sample}")
        self.images_per_sample = images_per_sample
        self.num_labels = num_labels

    def _check_extra(self, sample: dict[str, Any]) -> str | None:
        label = sample.get("label")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            return f"no integer label ({label!r})"
        if label < 0 or (self.num_labels is not None and label >= self.num_labels):
            return f"label {label} outside [0, {self.num_labels})"
        return None

    def __call__(self, samples: Iterable[Any]) -> dict[str, torch.Tensor]:
        batch, chosen, _ = self._collate(samples)
        batch["labels"] = torch.tensor([int(sample["label"]) for sample in chosen], dtype=torch.long)
        return batch


def vqa_answer_weights(
    answers: Sequence[str], weights: Sequence[float] | None = None
) -> tuple[list[str], list[float]]:
    """The distinct answers of a question and their weights, in order of first appearance.

    Without `weights`, each answer weighs its share of the annotations (`count / len(answers)`), as the original
    weighs the 10 VQA v2 answers; with them, the weights of repeated answers add up.
    """
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"got {len(weights)} weights for {len(answers)} answers")
    share = [1.0 / len(answers)] * len(answers) if weights is None else [float(w) for w in weights]
    merged: dict[str, float] = {}
    for answer, weight in zip(answers, share, strict=True):
        merged[answer] = merged.get(answer, 0.0) + weight
    return list(merged), list(merged.values())


class AlbefVqaCollator(AlbefImageTextCollator):
    """VQA training batches: images, questions and each question's weighted answers.

    Samples: `{"image", "text": question, "answers": [str, ...], "weights": [float, ...] (optional)}`.
    Questions are cleaned with `pre_question` (unless the processor's normalisation is off); answers are not
    cleaned (the original keeps them as they are) and are encoded by `AlbefProcessor.tokenize_answers` as
    "[CLS] answer [SEP]", the form `AlbefForQuestionAnswering` scores and `rank_answers` / `generate` use. Each
    distinct answer of a question appears once, weighted by `vqa_answer_weights`.

    Args:
        processor, transform, max_length, seed: as in `AlbefImageTextCollator` (`max_length` bounds the questions;
            the original truncates them at 25 tokens in training).
        answer_max_length: longest answer in tokens with [CLS] and [SEP] (default: the processor's `max_length`).

    Returns (from `__call__`):
        `pixel_values (Q, 3, H, W)`, `input_ids` / `attention_mask` `(Q, L)` questions; `answer_input_ids` /
        `answer_attention_mask` `(A, L_a)` all answers, question by question; `labels` (the answer ids, -100 at
        padding), `answer_weights (A,)` and `answers_per_question (Q,)`.
    """

    def __init__(
        self,
        processor: Any,
        transform: Callable[..., PIL.Image.Image] | None = None,
        max_length: int | None = None,
        seed: int | None = None,
        answer_max_length: int | None = None,
    ) -> None:
        super().__init__(processor, transform, max_length, seed)
        self.answer_max_length = answer_max_length

    def text_normalization(self) -> str | None:
        return self.processor.question_normalization

    def _check_extra(self, sample: dict[str, Any]) -> str | None:
        answers, weights = sample.get("answers"), sample.get("weights")
        if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
            return f"no list of answers ({answers!r})"
        if not all(isinstance(answer, str) and answer.strip() for answer in answers):
            return f"an empty or non-text answer in {list(answers)!r}"
        if weights is not None and len(weights) != len(answers):
            return f"{len(weights)} weights for {len(answers)} answers"
        return None

    def __call__(self, samples: Iterable[Any]) -> dict[str, torch.Tensor]:
        batch, chosen, _ = self._collate(samples)
        answers, weights, counts = [], [], []
        for sample in chosen:
            distinct, share = vqa_answer_weights(sample["answers"], sample.get("weights"))
            answers += distinct
            weights += share
            counts.append(len(distinct))
        encoded = self.processor.tokenize_answers(answers, max_length=self.answer_max_length)
        batch["answer_input_ids"] = encoded["input_ids"]
        batch["answer_attention_mask"] = encoded["attention_mask"]
        batch["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        batch["answer_weights"] = torch.tensor(weights, dtype=torch.float32)
        batch["answers_per_question"] = torch.tensor(counts, dtype=torch.long)
        return batch
