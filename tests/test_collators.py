"""Tests of albef_hf.data.collators: tokenisation, MLM masking, per-sample randomness, bad samples."""

import logging

import pytest
import torch
from conftest import CAPTIONS, random_images, tiny_processor
from PIL import Image
from torch.utils.data import DataLoader

from albef_hf.data.collators import (
    SAMPLE_KEY,
    AlbefPretrainingCollator,
    AlbefRetrievalCollator,
    EpochKeyedSampler,
    KeyedDataset,
)
from albef_hf.data.transforms import build_train_transform

PAD, UNK, CLS, SEP, MASK = range(5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def samples(count=4, keyed=True):
    images = random_images(count)
    out = []
    for i in range(count):
        sample = {"image": images[i], "text": CAPTIONS[i % len(CAPTIONS)], "image_id": 10 + i % 3}
        if keyed:
            sample[SAMPLE_KEY] = (0, i)
        out.append(sample)
    return out


def test_pretraining_batch_fields_and_masking_rules():
    collator = AlbefPretrainingCollator(tiny_processor(), mlm_probability=0.5, seed=0)
    batch = collator(samples(4))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"}
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    ids, labels, masked = batch["input_ids"], batch["mlm_labels"], batch["mlm_input_ids"]
    selected = labels != -100
    assert selected.any()
    assert torch.equal(labels[selected], ids[selected])
    assert not selected[(ids == PAD) | (ids == CLS) | (ids == SEP)].any()
    assert torch.equal(masked[~selected], ids[~selected])


def test_masking_is_80_10_10_over_many_tokens():
    processor = tiny_processor(max_length=40)
    text = " ".join(["red blue green yellow circle square triangle dog cat man"] * 3)
    collator = AlbefPretrainingCollator(processor, mlm_probability=0.3, seed=1)
    batch = collator(
        [{"image": image, "text": text, SAMPLE_KEY: (0, i)} for i, image in enumerate(random_images(64))]
    )
    selected = batch["mlm_labels"] != -100
    selectable = (batch["input_ids"] > MASK).sum()
    replaced = batch["mlm_input_ids"][selected]
    original = batch["mlm_labels"][selected]
    assert selected.sum() / selectable == pytest.approx(0.3, abs=0.03)
    assert (replaced == MASK).float().mean() == pytest.approx(0.8, abs=0.04)
    kept = (replaced == original).float().mean()
    assert kept == pytest.approx(0.1, abs=0.03)


def test_original_tokenization_has_no_sep_and_never_masks_cls():
    collator = AlbefPretrainingCollator(
        tiny_processor(original_tokenization=True), mlm_probability=1.0, seed=0
    )
    batch = collator(samples(4))
    assert (batch["input_ids"][:, 0] == CLS).all() and not (batch["input_ids"] == SEP).any()
    labels = batch["mlm_labels"]
    real = (batch["attention_mask"] == 1) & (batch["input_ids"] != CLS)
    assert (labels[real] != -100).all() and (labels[~real] == -100).all()


def test_keyed_randomness_depends_on_the_sample_only():
    """A sample's crop and mask are the same in any batch, and differ between epochs and seeds."""
    collator = AlbefPretrainingCollator(tiny_processor(), transform=build_train_transform(32), seed=3)
    data = samples(4)
    full = collator(data)
    alone = collator([data[2]])
    length = int(alone["attention_mask"].sum())
    assert torch.equal(full["pixel_values"][2], alone["pixel_values"][0])
    assert torch.equal(full["mlm_input_ids"][2, :length], alone["mlm_input_ids"][0, :length])
    next_epoch = collator([{**data[2], SAMPLE_KEY: (1, 2)}])
    assert not torch.equal(next_epoch["pixel_values"][0], alone["pixel_values"][0])
    collator.seed = 4
    assert not torch.equal(collator([data[2]])["pixel_values"][0], alone["pixel_values"][0])


def test_unkeyed_samples_draw_from_a_stream():
    collator = AlbefPretrainingCollator(tiny_processor(), transform=build_train_transform(32), seed=0)
    sample = samples(1, keyed=False)
    assert not torch.equal(collator(sample)["pixel_values"], collator(sample)["pixel_values"])


def test_bad_samples_are_replaced_within_the_batch_and_counted(caplog):
    collator = AlbefRetrievalCollator(tiny_processor(), seed=0)
    data = samples(5)
    data[1]["text"] = "  ?!  "  # empty after normalisation
    data[3]["image"] = Image.new("RGB", (0, 0))
    data[4]["image_id"] = None
    with caplog.at_level(logging.WARNING):
        batch = collator(data)
    assert batch["pixel_values"].shape[0] == 5
    assert batch["idx"].tolist() == [10, 12, 12, 10, 10]  # each bad one replaced by the next good one
    assert collator.num_skipped == 3 and "replaced by another sample of its batch" in caplog.text
    with pytest.raises(ValueError, match="no usable sample"):
        collator([{"image": None, "text": "", "image_id": 1}])
    for not_a_list in (data[0], "a dog", None):
        with pytest.raises(TypeError, match="a collator takes a list of samples"):
            collator(not_a_list)


def test_retrieval_batch_carries_image_ids():
    batch = AlbefRetrievalCollator(tiny_processor())(samples(4))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "idx"}
    assert batch["idx"].tolist() == [10, 11, 12, 10] and batch["idx"].dtype == torch.long


def test_keyed_sampler_and_dataset_give_epoch_keys():
    dataset = KeyedDataset([{"text": str(i)} for i in range(5)])
    sampler = EpochKeyedSampler(len(dataset), seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == list(range(5)) and sorted(second) == list(range(5, 10))
    assert [k - 5 for k in second] != first  # reshuffled
    sample = dataset[second[0]]
    assert sample[SAMPLE_KEY] == (1, second[0] - 5) and sample["text"] == str(second[0] - 5)
    loader = DataLoader(dataset, sampler=sampler, batch_size=2, collate_fn=list)
    assert [s[SAMPLE_KEY][0] for batch in loader for s in batch] == [1] * 5


def test_batches_do_not_depend_on_dataloader_workers():
    dataset = KeyedDataset(samples(8, keyed=False))
    collator = AlbefPretrainingCollator(tiny_processor(), transform=build_train_transform(32), seed=5)

    def batches(workers):
        sampler = EpochKeyedSampler(len(dataset), seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collator, num_workers=workers)
        return list(loader)

    for serial, parallel in zip(batches(0), batches(2), strict=True):
        for key in serial:
            assert torch.equal(serial[key], parallel[key]), key
