"""Parity of the task models with the original ALBEF code (tests/fixtures/albef_original, the `_spread_` sets).

Each reference model is loaded strictly through `rename_original_key`; eval outputs, the training loss (with
distillation from a teacher equal to the momentum weights, which equal the student before the recorded step)
and the recorded gradients must match to 1e-4 in fp32.
"""

from __future__ import annotations

import pytest
import torch
from albef_original import load_reference_model, rename_original_key

from albef_hf import (
    AlbefForImageTextRetrieval,
    AlbefForQuestionAnswering,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    gradcam_itm,
)

TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual.detach().float() - expected.float()).abs().max().item() <= TOLERANCE


def assert_gradients(model, outputs: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    recorded = {key.removeprefix("train.grads."): value for key, value in outputs.items() if ".grads." in key}
    assert recorded
    for original_name, grad in recorded.items():
        assert_close(params[rename_original_key(original_name)].grad, grad)


def vqa_training_batch(outputs: dict, meta: dict) -> dict:
    answers = outputs["inputs.train_answer_ids"]
    return {
        "input_ids": outputs["inputs.question_ids"],
        "attention_mask": outputs["inputs.question_atts"],
        "pixel_values": outputs["inputs.image"],
        "answer_input_ids": answers,
        "answer_attention_mask": outputs["inputs.train_answer_atts"],
        "labels": answers.masked_fill(answers == meta["tokenizer_ids"]["pad"], -100),
        "answer_weights": outputs["inputs.train_weights"],
        "answers_per_question": torch.tensor(meta["values"]["inputs.train_k"]),
    }


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vqa_ranking_matches_original(attn):
    model, outputs, meta = load_reference_model("vqa", AlbefForQuestionAnswering, attn)
    ranking = model.rank_answers(
        outputs["inputs.answer_list_ids"],
        outputs["inputs.answer_list_atts"],
        input_ids=outputs["inputs.question_ids"],
        pixel_values=outputs["inputs.image"],
        attention_mask=outputs["inputs.question_atts"],
        k=meta["values"]["inputs.k_test"],
    )
    assert_close(ranking.question_states, outputs["eval.question_states"])
    assert_close(ranking.first_token_logits, outputs["eval.first_token_logits"])
    assert torch.equal(ranking.answer_ids, outputs["eval.topk_ids"])
    assert_close(ranking.probs, outputs["eval.topk_probs"])
    with torch.no_grad():
        image_embeds = model.encode_image(outputs["inputs.image"]).last_hidden_state
    assert_close(image_embeds, outputs["eval.image_embeds"])


def test_vqa_training_loss_and_gradients_match_original():
    model, outputs, meta = load_reference_model("vqa", AlbefForQuestionAnswering)
    model.train()
    batch = vqa_training_batch(outputs, meta)
    teacher_outputs = model.compute_teacher_outputs(**batch)
    loss = model(**batch, teacher_outputs=teacher_outputs, alpha=meta["values"]["inputs.alpha"]).loss
    assert_close(loss, outputs["train.loss"])
    loss.backward()
    assert_gradients(model, outputs)


def nlvr_inputs(outputs: dict) -> dict:
    # The original concatenates all first images, then all second images.
    image0, image1 = outputs["inputs.image"].chunk(2)
    return {
        "input_ids": outputs["inputs.input_ids"],
        "attention_mask": outputs["inputs.attention_mask"],
        "pixel_values": torch.stack([image0, image1], dim=1),
    }


def single_image_inputs(outputs: dict) -> dict:
    return {
        "input_ids": outputs["inputs.input_ids"],
        "attention_mask": outputs["inputs.attention_mask"],
        "pixel_values": outputs["inputs.image"],
    }


CLASSIFIERS = [
    ("nlvr", AlbefForVisualReasoning, nlvr_inputs),
    ("ve", AlbefForVisualEntailment, single_image_inputs),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("task", "model_class", "make_inputs"), CLASSIFIERS)
def test_classifier_logits_match_original(task, model_class, make_inputs, attn):
    model, outputs, _ = load_reference_model(task, model_class, attn)
    with torch.no_grad():
        logits = model(**make_inputs(outputs)).logits
    assert_close(logits, outputs["eval.logits"])


@pytest.mark.parametrize(("task", "model_class", "make_inputs"), CLASSIFIERS)
def test_classifier_training_loss_and_gradients_match_original(task, model_class, make_inputs):
    model, outputs, meta = load_reference_model(task, model_class)
    model.train()
    batch = {**make_inputs(outputs), "labels": outputs["inputs.targets"]}
    teacher_outputs = model.compute_teacher_outputs(**batch)
    loss = model(**batch, teacher_outputs=teacher_outputs, alpha=meta["values"]["inputs.alpha"]).loss
    assert_close(loss, outputs["train.loss"])
    loss.backward()
    assert_gradients(model, outputs)


def test_grounding_gradcam_matches_original_at_every_fusion_block():
    model, outputs, meta = load_reference_model("grounding", AlbefForImageTextRetrieval)
    inputs = single_image_inputs(outputs)
    blocks = sorted({int(key.split(".")[2]) for key in outputs if key.startswith("eval.per_block.")})
    assert blocks == [2, 3]
    for block in blocks:
        cam = gradcam_itm(model, layer=block, **inputs)
        expected = f"eval.per_block.{block}."
        assert_close(cam.gradcam, outputs[expected + "gradcam"])
        assert_close(cam.itm_logits, outputs[expected + "itm_logits"])
        assert_close(cam.attentions, outputs[expected + "attention_map"])
        assert_close(cam.attention_grads, outputs[expected + "attention_grad"])
    # The default layer is the original's choice (the third fusion layer, here the last one).
    default = gradcam_itm(model, **inputs)
    assert default.layer == meta["values"]["eval.primary_block_num"]
    assert_close(default.gradcam, outputs["eval.gradcam"])
    assert all(param.grad is None for param in model.parameters())
