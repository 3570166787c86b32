"""The built-in zero-shot-image-classification pipeline serves a saved ALBEF folder."""

from __future__ import annotations

import math

import torch
from conftest import random_images, tiny_config, tiny_processor
from transformers import pipeline

from albef_hf import AlbefForPreTraining, AlbefModel


def test_zero_shot_pipeline_on_a_saved_folder(tmp_path):
    AlbefForPreTraining(tiny_config()).save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    assert isinstance(classifier.model, AlbefModel)
    labels = ["dog", "cat", "red circle"]
    image = random_images(1)[0]
    results = classifier(image, candidate_labels=labels)
    assert sorted(r["label"] for r in results) == sorted(labels)
    assert math.isclose(sum(r["score"] for r in results), 1.0, abs_tol=1e-5)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)

    # the scores are the softmax of the model's own ITC logits for the same inputs
    model = AlbefModel.from_pretrained(tmp_path).eval()
    texts = classifier.tokenizer(
        [f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt"
    )
    pixels = classifier.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values=pixels, **texts).logits_per_image.softmax(dim=-1)[0]
    by_label = {r["label"]: r["score"] for r in results}
    for label, prob in zip(labels, probs.tolist(), strict=True):
        assert math.isclose(by_label[label], prob, rel_tol=1e-4)
