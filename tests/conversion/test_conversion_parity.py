"""Parity of converted checkpoints with the original ALBEF implementation (issue 6, "done when" 1).

Each task's tiny original checkpoint (faithful layout: momentum copies, queues, tied copies) is converted by the
converter (script, `main` or API; see conftest.py), loaded from the written folder, and run on the inputs the
original was run on. Every output the original recorded must agree to 1e-4 (max abs, fp32): eval outputs,
training losses with the teacher built from the folder's momentum state and the recorded hard negatives and
MLM masks replayed, and the recorded gradients.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from albef_hf import (
    AlbefForImageTextRetrieval,
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    gradcam_itm,
)
from albef_hf.conversion import MOMENTUM_STATE_FILE, map_original_key

from .original_layout import assert_parity, load_reference


def _student_and_teacher(model_class, folder):
    """The converted model in training mode, and its momentum teacher as the Trainer builds it: the student
    with every `teacher.*` weight of the folder's momentum state."""
    student = model_class.from_pretrained(folder).train()
    momentum = load_file(folder / MOMENTUM_STATE_FILE)
    teacher = model_class.from_pretrained(folder)
    state = teacher.state_dict()
    teacher_weights = {
        name.removeprefix("teacher."): t for name, t in momentum.items() if name.startswith("teacher.")
    }
    assert teacher_weights and set(teacher_weights) <= set(state)
    teacher.load_state_dict({**state, **teacher_weights})
    return student, teacher.eval(), momentum


def _check_gradients(model, reference, layout: str) -> None:
    parameters = dict(model.named_parameters(remove_duplicate=False))
    recorded = reference.grads()
    assert recorded
    for original_name, expected in recorded.items():
        name, _ = map_original_key(original_name, layout)
        assert_parity(parameters[name].grad, expected, f"gradient of {original_name}")


def _recorded_negatives(reference) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(reference["sampling.neg_image_idx_per_text"]),
        torch.tensor(reference["sampling.neg_text_idx_per_image"]),
    )


# ----------------------------------------------------------------------------------------------
# Pretraining (ALBEF.pth / ALBEF_4M.pth)
# ----------------------------------------------------------------------------------------------

PRETRAIN_OUTPUTS = [
    "image_embeds",
    "image_feat",
    "text_embeds",
    "text_feat",
    "itm_logits_pos",
    "mlm_logits",
    "sim_i2t",
]


@pytest.fixture(scope="module")
def pretrain_eval(pretrain_dir):
    reference = load_reference("pretrain")
    image, ids, mask = (
        reference["inputs.image"],
        reference["inputs.input_ids"],
        reference["inputs.attention_mask"],
    )
    model = AlbefForPreTraining.from_pretrained(pretrain_dir).eval()
    with torch.no_grad():
        image_embeds = model.encode_image(image).last_hidden_state
        text_embeds = model.encode_text(ids, mask).last_hidden_state
        image_feat, text_feat = model.project_image(image_embeds), model.project_text(text_embeds)
        ours = {
            "image_embeds": image_embeds,
            "image_feat": image_feat,
            "text_embeds": text_embeds,
            "text_feat": text_feat,
            "itm_logits_pos": model.itm_logits(text_embeds, mask, image_embeds),
            "mlm_logits": model.mlm_logits_at(reference["inputs.mlm_input_ids"], mask, image_embeds),
            "sim_i2t": image_feat @ text_feat.T / model.clamped_temp(),
        }
    return ours, reference


@pytest.mark.parametrize("name", PRETRAIN_OUTPUTS)
def test_pretrain_eval_output(pretrain_eval, name):
    ours, reference = pretrain_eval
    assert_parity(ours[name], reference[f"eval.{name}"], f"pretrain {name}")


def test_pretrain_training_losses_gradients_and_queues(pretrain_dir):
    """ITC/ITM/MLM with distillation from the checkpoint's momentum weights and queues, replaying the recorded
    hard negatives and MLM masks; gradients of the total loss; the teacher features the original enqueued."""
    reference = load_reference("pretrain")
    student, teacher, momentum = _student_and_teacher(AlbefForPreTraining, pretrain_dir)
    batch = {
        "pixel_values": reference["inputs.image"],
        "input_ids": reference["inputs.input_ids"],
        "attention_mask": reference["inputs.attention_mask"],
    }
    masks = {
        "mlm_input_ids": reference["sampling.mlm_masked_input_ids"],
        "mlm_labels": reference["sampling.mlm_labels"],
    }
    teacher_outputs = teacher.compute_teacher_outputs(**batch, **masks)
    output = student(
        **batch,
        **masks,
        teacher_outputs=teacher_outputs,
        image_queue=momentum["image_queue"],
        text_queue=momentum["text_queue"],
        alpha=reference["inputs.alpha"],
        hard_negatives=_recorded_negatives(reference),
    )
    assert_parity(output.loss_itc, reference["train.loss_ita"], "loss_ita")
    assert_parity(output.loss_itm, reference["train.loss_itm"], "loss_itm")
    assert_parity(output.loss_mlm, reference["train.loss_mlm"], "loss_mlm")
    output.loss.backward()
    _check_gradients(student, reference, "pretrain")

    # The original enqueues the teacher's features at queue_ptr; our queues are its transpose.
    pointer, size = int(momentum["queue_ptr"]), batch["input_ids"].shape[0]
    for name in ("image", "text"):
        after = reference[f"train.{name}_queue_after"].T
        assert_parity(
            getattr(teacher_outputs, f"{name}_feat"), after[pointer : pointer + size], f"enqueued {name}"
        )
        assert torch.equal(after[pointer + size :], momentum[f"{name}_queue"][pointer + size :])
    assert int(reference["train.queue_ptr_after"]) == pointer + size


# ----------------------------------------------------------------------------------------------
# Retrieval (mscoco.pth / flickr30k.pth)
# ----------------------------------------------------------------------------------------------

RETRIEVAL_OUTPUTS = [
    "image_embeds",
    "image_feat",
    "text_embeds",
    "text_feat",
    "itm_logits_pos",
    "eval_sims_matrix",
    "eval_score_matrix_i2t",
    "eval_score_matrix_t2i",
]


@pytest.fixture(scope="module")
def retrieval_eval(retrieval_dir):
    reference = load_reference("retrieval")
    mask, eval_mask = reference["inputs.attention_mask"], reference["inputs.eval_text_atts"]
    model = AlbefForImageTextRetrieval.from_pretrained(retrieval_dir).eval()
    with torch.no_grad():
        image_embeds = model.encode_image(reference["inputs.image"]).last_hidden_state
        text_embeds = model.encode_text(reference["inputs.input_ids"], mask).last_hidden_state
        eval_text_embeds = model.encode_text(reference["inputs.eval_text_ids"], eval_mask).last_hidden_state
        ranking = model.rank(image_embeds, eval_text_embeds, eval_mask, k=reference["inputs.k_test"])
        ours = {
            "image_embeds": image_embeds,
            "image_feat": model.project_image(image_embeds),
            "text_embeds": text_embeds,
            "text_feat": model.project_text(text_embeds),
            "itm_logits_pos": model.itm_logits(text_embeds, mask, image_embeds),
            "eval_sims_matrix": ranking.sims,
            "eval_score_matrix_i2t": ranking.scores_i2t,
            "eval_score_matrix_t2i": ranking.scores_t2i,
        }
    return ours, reference


@pytest.mark.parametrize("name", RETRIEVAL_OUTPUTS)
def test_retrieval_eval_output(retrieval_eval, name):
    ours, reference = retrieval_eval
    assert_parity(ours[name], reference[f"eval.{name}"], f"retrieval {name}")


def test_retrieval_reranks_the_same_candidates(retrieval_eval):
    ours, reference = retrieval_eval
    for name in ("eval_score_matrix_i2t", "eval_score_matrix_t2i"):
        assert torch.equal(ours[name] == -100, reference[f"eval.{name}"] == -100), name


def test_retrieval_training_losses_and_gradients(retrieval_dir):
    """ITC with image ids and the idx queue, distilled from the momentum teacher, and ITM with the recorded hard
    negatives; the image ids the original enqueued."""
    reference = load_reference("retrieval")
    student, teacher, momentum = _student_and_teacher(AlbefForImageTextRetrieval, retrieval_dir)
    batch = {
        "pixel_values": reference["inputs.image"],
        "input_ids": reference["inputs.input_ids"],
        "attention_mask": reference["inputs.attention_mask"],
    }
    output = student(
        **batch,
        idx=reference["inputs.idx"],
        teacher_outputs=teacher.compute_teacher_outputs(**batch),
        image_queue=momentum["image_queue"],
        text_queue=momentum["text_queue"],
        idx_queue=momentum["idx_queue"],
        alpha=reference["inputs.alpha"],
        hard_negatives=_recorded_negatives(reference),
    )
    assert_parity(output.loss_itc, reference["train.loss_ita"], "loss_ita")
    assert_parity(output.loss_itm, reference["train.loss_itm"], "loss_itm")
    output.loss.backward()
    _check_gradients(student, reference, "retrieval")
    size, after = reference["inputs.idx"].shape[0], reference["train.idx_queue_after"].view(-1)
    assert torch.equal(after[:size], reference["inputs.idx"])
    assert torch.equal(after[size:], momentum["idx_queue"][size:])


# ----------------------------------------------------------------------------------------------
# Grounding (refcoco.pth: the retrieval model, Grad-CAM of the ITM score)
# ----------------------------------------------------------------------------------------------

GROUNDING_OUTPUTS = {
    "gradcam": "gradcam",
    "itm_logits": "itm_logits",
    "attention_map": "attentions",
    "attention_grad": "attention_grads",
}


@pytest.mark.parametrize("name", sorted(GROUNDING_OUTPUTS))
def test_grounding_every_fusion_block(grounding_dir, name):
    reference = load_reference("grounding")
    model = AlbefForImageTextRetrieval.from_pretrained(grounding_dir).eval()
    inputs = {
        "pixel_values": reference["inputs.image"],
        "input_ids": reference["inputs.input_ids"],
        "attention_mask": reference["inputs.attention_mask"],
    }
    blocks = sorted(
        {int(key.split(".")[2]) for key in reference.tensors if key.startswith("eval.per_block.")}
    )
    assert blocks == list(range(model.config.fusion_layer, model.config.text_config.num_hidden_layers))
    for block in blocks:
        ours = getattr(gradcam_itm(model, layer=block, **inputs), GROUNDING_OUTPUTS[name])
        expected = reference[f"eval.per_block.{block}.{name}"]
        assert_parity(ours, expected, f"grounding block {block} {name}")
        # Grad-CAM values are ~1e-3: bound the error relative to the map's scale too.
        scale = expected.abs().max()
        assert_parity(ours / scale, expected / scale, f"grounding block {block} {name} (relative)")
    primary = gradcam_itm(model, **inputs)
    assert primary.layer == reference["eval.primary_block_num"]
    assert_parity(primary.gradcam, reference["eval.gradcam"], "grounding primary Grad-CAM")


# ----------------------------------------------------------------------------------------------
# VQA (vqa.pth)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa_ranking(converted):
    reference = load_reference("vqa")
    model = AlbefForQuestionAnswering.from_pretrained(converted("vqa")).eval()
    with torch.no_grad():
        ranking = model.rank_answers(
            reference["inputs.answer_list_ids"],
            reference["inputs.answer_list_atts"],
            input_ids=reference["inputs.question_ids"],
            pixel_values=reference["inputs.image"],
            attention_mask=reference["inputs.question_atts"],
            k=reference["inputs.k_test"],
        )
        image_embeds = model.encode_image(reference["inputs.image"]).last_hidden_state
    return ranking, image_embeds, reference


@pytest.mark.parametrize(
    ("ours", "name"),
    [
        ("question_states", "question_states"),
        ("first_token_logits", "first_token_logits"),
        ("probs", "topk_probs"),
    ],
)
def test_vqa_eval_output(vqa_ranking, ours, name):
    ranking, _, reference = vqa_ranking
    assert_parity(getattr(ranking, ours), reference[f"eval.{name}"], f"vqa {name}")


def test_vqa_top_k_answers_and_image_embeds(vqa_ranking):
    ranking, image_embeds, reference = vqa_ranking
    assert torch.equal(ranking.answer_ids, reference["eval.topk_ids"])
    assert_parity(image_embeds, reference["eval.image_embeds"], "vqa image_embeds")


def test_vqa_training_loss_and_gradients(converted):
    reference = load_reference("vqa")
    student, teacher, _ = _student_and_teacher(AlbefForQuestionAnswering, converted("vqa"))
    answers = reference["inputs.train_answer_ids"]
    batch = {
        "input_ids": reference["inputs.question_ids"],
        "attention_mask": reference["inputs.question_atts"],
        "pixel_values": reference["inputs.image"],
        "answer_input_ids": answers,
        "answer_attention_mask": reference["inputs.train_answer_atts"],
        "labels": answers.masked_fill(answers == reference.meta["tokenizer_ids"]["pad"], -100),
        "answer_weights": reference["inputs.train_weights"],
        "answers_per_question": torch.tensor(reference["inputs.train_k"]),
    }
    teacher_outputs = teacher.compute_teacher_outputs(**batch)
    loss = student(**batch, teacher_outputs=teacher_outputs, alpha=reference["inputs.alpha"]).loss
    assert_parity(loss, reference["train.loss"], "vqa loss")
    loss.backward()
    _check_gradients(student, reference, "vqa")


# ----------------------------------------------------------------------------------------------
# NLVR2 and SNLI-VE (their fine-tuned checkpoints)
# ----------------------------------------------------------------------------------------------


def _classifier_inputs(task: str, reference) -> dict:
    pixel_values = reference["inputs.image"]
    if task == "nlvr":  # the original concatenates all first images, then all second images
        pixel_values = torch.stack(pixel_values.chunk(2), dim=1)
    return {
        "input_ids": reference["inputs.input_ids"],
        "attention_mask": reference["inputs.attention_mask"],
        "pixel_values": pixel_values,
    }


CLASSIFIERS = [("nlvr", AlbefForVisualReasoning), ("ve", AlbefForVisualEntailment)]


@pytest.mark.parametrize(("task", "model_class"), CLASSIFIERS)
def test_classifier_logits(converted, task, model_class):
    reference = load_reference(task)
    model = model_class.from_pretrained(converted(task)).eval()
    with torch.no_grad():
        logits = model(**_classifier_inputs(task, reference)).logits
    assert_parity(logits, reference["eval.logits"], f"{task} logits")


@pytest.mark.parametrize(("task", "model_class"), CLASSIFIERS)
def test_classifier_training_loss_and_gradients(converted, task, model_class):
    reference = load_reference(task)
    student, teacher, _ = _student_and_teacher(model_class, converted(task))
    batch = {**_classifier_inputs(task, reference), "labels": reference["inputs.targets"]}
    teacher_outputs = teacher.compute_teacher_outputs(**batch)
    loss = student(**batch, teacher_outputs=teacher_outputs, alpha=reference["inputs.alpha"]).loss
    assert_parity(loss, reference["train.loss"], f"{task} loss")
    loss.backward()
    _check_gradients(student, reference, task)
