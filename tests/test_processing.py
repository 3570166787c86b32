"""Processor: original text normalisation and tokenisation, image handling, and clear errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import random_images, tiny_processor
from transformers import AutoProcessor

from albef_hf import AlbefImageProcessor, AlbefProcessor, pre_caption, pre_question

CAPTION_CASES = [
    ("A Dog, running!", "a dog running"),
    ('He said "hi" (twice)...', "he said hi twice"),
    ("well-known/famous place", "well known famous place"),
    ("  many    spaces\there  ", "many spaces\there"),  # the original collapses only runs of 2+ spaces
    ("a <person> rides a horse", "a person rides a horse"),
    ("it's #1: yes; no ~ maybe*", "its 1 yes no maybe"),
    ("trailing newline\n", "trailing newline"),
    ("Ünïcode Stays", "ünïcode stays"),
]


@pytest.mark.parametrize(("raw", "expected"), CAPTION_CASES)
def test_pre_caption_matches_the_original_rules(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_words():
    assert pre_caption(" ".join(f"w{i}" for i in range(40)), max_words=30).split() == [
        f"w{i}" for i in range(30)
    ]


def test_pre_question_keeps_inner_spacing_and_person_tag():
    assert pre_question("What  is <person> doing?  ") == "what  is <person> doing"
    assert pre_question("Is it red-ish/blue?") == "is it red ish blue"


def test_tokenisation_standard_and_original(processor):
    standard = processor(text=["a red circle", "two dogs running"])
    ids = standard["input_ids"]
    assert ids[0, 0] == 2 and ids[0, 4] == 3  # [CLS] a red circle [SEP]
    original = tiny_processor(original_tokenization=True)(text=["a red circle", "two dogs running"])
    assert torch.all(original["input_ids"][:, 0] == 2)
    assert not (original["input_ids"] == 3).any(), "original tokenisation must not emit [SEP]"
    assert original["input_ids"].shape[1] == ids.shape[1] - 1
    torch.testing.assert_close(original["input_ids"][0, :4], ids[0, :4])
    assert original["attention_mask"].sum().item() == standard["attention_mask"].sum().item() - 2


def test_original_tokenisation_truncates_like_the_original():
    processor = tiny_processor(original_tokenization=True, max_length=4)
    out = processor(text=["a red circle left of a blue square"])
    assert out["input_ids"].tolist() == [[2, 5, 20, 24]]  # [CLS] + 3 tokens, no [SEP]
    padded = processor(text=["a red"], padding="max_length")
    assert padded["input_ids"].tolist() == [[2, 5, 20, 0]] and padded["attention_mask"].tolist() == [
        [1, 1, 1, 0]
    ]


def test_text_is_normalised_before_tokenisation(processor):
    assert torch.equal(
        processor(text="A RED, circle!")["input_ids"], processor(text="a red circle")["input_ids"]
    )
    raw = processor(text="A RED circle", text_normalization=None)["input_ids"]
    assert torch.equal(raw, processor(text="a red circle")["input_ids"])  # the tokenizer lowercases anyway


def test_images_from_pil_numpy_torch_and_paths(tmp_path):
    image_processor = AlbefImageProcessor(size=32)
    pil = random_images(1)[0]
    path = tmp_path / "image.png"
    pil.save(path)
    array = np.array(pil)
    reference = image_processor(pil)["pixel_values"]
    assert reference.shape == (1, 3, 32, 32) and reference.dtype == torch.float32
    for variant in (
        array,
        array.transpose(2, 0, 1),
        torch.from_numpy(array),
        array.astype(np.float32) / 255,
        path,
    ):
        torch.testing.assert_close(image_processor(variant)["pixel_values"], reference)
    grey = image_processor(np.asarray(pil.convert("L")))["pixel_values"]
    assert torch.allclose(
        grey[0, 0] * 0.26862954 + 0.48145466, grey[0, 1] * 0.26130258 + 0.4578275, atol=1e-5
    )
    rgba = image_processor(pil.convert("RGBA"))["pixel_values"]
    torch.testing.assert_close(rgba, reference)


def test_resize_normalise_values():
    image_processor = AlbefImageProcessor(size={"height": 2, "width": 2})
    white = PIL.Image.new("RGB", (7, 5), (255, 255, 255))
    values = image_processor(white)["pixel_values"][0, :, 0, 0]
    expected = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    torch.testing.assert_close(values, expected)


def test_a_batch_equals_its_images_one_by_one():
    # a batch of one size is normalised with one array operation per step: the same float32 values as alone
    image_processor = AlbefImageProcessor(size=24)
    images = [PIL.Image.new("RGB", (w, h), c) for w, h, c in ((24, 24, (9, 200, 77)), (40, 31, (255, 0, 3)))]
    images.append(random_images(1)[0])
    batch = image_processor(images)["pixel_values"]
    assert batch.shape == (3, 3, 24, 24) and batch.is_contiguous()
    for row, image in zip(batch, images, strict=True):
        assert torch.equal(row, image_processor(image)["pixel_values"][0])
    # without resizing, images of other sizes stay apart as arrays and cannot become one tensor
    mixed = image_processor(images[:2], do_resize=False, return_tensors=None)["pixel_values"]
    assert [array.shape for array in mixed] == [(3, 24, 24), (3, 31, 40)]
    assert np.array_equal(mixed[0], batch[0].numpy())
    with pytest.raises(ValueError, match="different sizes"):
        image_processor(images[:2], do_resize=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": []}, "empty list of images"),
        ({"images": [np.zeros((8, 8, 2), dtype=np.uint8)]}, "1, 3 or 4 channels"),
        ({"images": [np.zeros((0, 8, 3), dtype=np.uint8)]}, "empty image"),
        ({"images": ["not an image at all"]}, "could not read an image"),
        ({"images": [np.full((8, 8, 3), np.nan, dtype=np.float32)]}, "holds 192 NaN and 0 infinite values"),
        ({"images": [torch.tensor([[0.5, float("inf")], [0.0, -float("inf")]])]}, "0 NaN and 2 infinite"),
        ({"images": [{"an": "image?"}]}, "expected a PIL image"),
        ({"text": []}, "empty list of texts"),
        ({"text": ["a dog", "!!!"]}, "text 1 is empty"),
        ({"text": [3]}, "list of strings"),
        ({}, "needs `images`, `text`"),
    ],
)
def test_bad_inputs_raise_value_errors(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_pairs_must_match(processor):
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        processor(images=random_images(2), text=["a", "b dog", "c cat"], pairs=True)
    out = processor(images=random_images(2), text=["a dog", "a cat", "a man"])  # not pairs: any counts
    assert out["pixel_values"].shape[0] == 2 and out["input_ids"].shape[0] == 3


def test_processor_round_trip(tmp_path):
    processor = tiny_processor(original_tokenization=True, max_length=12, text_normalization="question")
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, AlbefProcessor)
    assert (loaded.max_length, loaded.original_tokenization, loaded.text_normalization) == (
        12,
        True,
        "question",
    )
    assert loaded.image_processor.size == {"height": 32, "width": 32}
    images, texts = random_images(2), ["what  colour is it?", "how many dogs"]
    expected, actual = processor(images=images, text=texts), loaded(images=images, text=texts)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_answers_are_cls_answer_sep_and_pad_to_the_given_length():
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    encoded = processor.tokenize_answers(
        ["red", "two blue circles left of"], max_length=5, padding="max_length"
    )
    body = tokenizer("two blue circles left of", add_special_tokens=False)["input_ids"]
    red = tokenizer.convert_tokens_to_ids("red")
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert encoded["input_ids"].tolist() == [[cls, red, sep, pad, pad], [cls, *body[:3], sep]]
    assert encoded["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert set(encoded) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="non-empty strings"):
        processor.tokenize_answers(["red", " "])
