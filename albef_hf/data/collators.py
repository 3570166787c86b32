"""Collators that turn reader samples into ALBEF training batches, and sample keys for exact resumption.

A reader sample is `{"image": PIL.Image, "text": str, "image_id": int, ...}` (see `albef_hf.data.readers`).

- `AlbefPretrainingCollator`: training transform, tokenisation (`AlbefProcessor`), MLM masking 80/10/10
  that never masks special or padding tokens -> `pixel_values, input_ids, attention_mask, mlm_input_ids,
  mlm_labels`.
- `AlbefRetrievalCollator`: training transform and tokenisation -> `pixel_values, input_ids,
  attention_mask, idx` (the image ids that define positives in retrieval fine-tuning).

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
queues and the cross-process gather rely on it), counted in `num_skipped` and logged. A batch without any
good sample raises a `ValueError` that says why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, Sampler

from ..image_processing_albef import to_pil_rgb
from ..losses import mask_tokens
from .transforms import RandomTransform

__all__ = [
    "SAMPLE_KEY",
    "AlbefPretrainingCollator",
    "AlbefRetrievalCollator",
    "EpochKeyedSampler",
    "KeyedDataset",
]

logger = logging.getLogger(__name__)

#: Sample field holding `(epoch, dataset index)`, which seeds the sample's augmentation and masking.
SAMPLE_KEY = "sample_key"
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


class _ImageTextCollator:
    """Shared part: validation, per-sample generators, transform, tokenisation."""

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
        self.num_skipped = 0
        self._stream: np.random.Generator | None = None
        self._stream_key: tuple[int, int] | None = None

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

    def _prepare(self, sample: Any, transform_seed: int) -> tuple[PIL.Image.Image, str] | str:
        """(transformed image, text) or the reason why the sample is bad."""
        if not isinstance(sample, dict):
            return f"not a dict sample ({type(sample).__name__})"
        text = sample.get("text")
        if not isinstance(text, str):
            return f"no caption (text={text!r})"
        if not self.processor.normalize([text])[0].strip():
            return f"empty caption after normalisation ({text!r})"
        reason = self._check_extra(sample)
        if reason:
            return reason
        try:
            image = to_pil_rgb(sample.get("image"))
            if self.transform is not None:
                if isinstance(self.transform, RandomTransform):
                    image = self.transform(image, rng=np.random.default_rng(transform_seed))
                else:
                    image = self.transform(image)
        except (OSError, ValueError, SyntaxError, EOFError, TypeError) as error:
            return f"unusable image ({error})"
        return image, text

    def _check_extra(self, sample: dict[str, Any]) -> str | None:
        return None

    def _skip(self, reason: str) -> None:
        self.num_skipped += 1
        if self.num_skipped & (self.num_skipped - 1) == 0:  # 1st, 2nd, 4th, ... skip
            logger.warning(
                "%s: replaced a bad sample by another of its batch (%s); %d replaced in this process so far",
                type(self).__name__,
                reason,
                self.num_skipped,
            )

    def _collate(
        self, samples: Iterable[Any]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[int]]:
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
        images = [prepared[i][0] for i in chosen]
        texts = [prepared[i][1] for i in chosen]
        batch = self.processor(images=images, text=texts, pairs=True, max_length=self.max_length)
        return dict(batch), [samples[i] for i in chosen], [seeds[i][1] for i in chosen]


class AlbefPretrainingCollator(_ImageTextCollator):
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


class AlbefRetrievalCollator(_ImageTextCollator):
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
