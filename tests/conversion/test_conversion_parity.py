"""Parity of converted checkpoints with the original ALBEF implementation (issue 6, "done when" 1).

Each tiny original checkpoint is converted by the converter (script, `main` or API; see conftest.py), loaded
from the written folder, and run on the inputs the original was run on. Every output the original recorded
must agree to 1e-4 (max abs, fp32): eval outputs, training losses with the recorded hard negatives and MLM
masks replayed, and the recorded gradients.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from albef_hf import AlbefForImageTextRetrieval, AlbefForPreTraining
from albef_hf.conversion import MOMENTUM_STATE_FILE, map_original_key

from .original_layout import assert_parity, load_outputs


def _teacher(model_class, folder, momentum: dict[str, torch.Tensor] | None):
    """The momentum teacher as the Trainer builds it: the student, overwritten by the `teacher.*` weights."""
    teacher = model_class.from_pretrained(folder)
    if momentum is not None:
        state = teacher.state_dict()
        state.update(
            {name[len("teacher.") :]: t for name, t in momentum.items() if name.startswith("teacher.")}
        )
        teacher.load_state_dict(state)
    return teacher.eval()


def _recorded_negatives(sampling: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(sampling["neg_image_idx_per_text"]), torch.tensor(sampling["neg_text_idx_per_image"])


def _check_gradients(model, recorded: dict[str, torch.Tensor], layout: str) -> None:
    parameters = dict(model.named_parameters())
    for original_name, expected in recorded.items():
        name, _ = map_original_key(original_name, layout)
        assert_parity(parameters[name].grad, expected, f"gradient of {original_name}")


# ----------------------------------------------------------------------------------------------
# Pretraining (ALBEF.pth / ALBEF_4M.pth layout)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_eval(pretrain_dir):
    reference = load_outputs("pretrain")
    inputs = reference["inputs"]
    model = AlbefForPreTraining.from_pretrained(pretrain_dir).eval()
    with torch.no_grad():
        image_embeds = model.encode_image(inputs["image"]).last_hidden_state
        text_embeds = model.encode_text(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
        image_feat, text_feat = model.project_image(image_embeds), model.project_text(text_embeds)
        ours = {
            "image_embeds": image_embeds,
            "image_feat": image_feat,
            "text_embeds": text_embeds,
            "text_feat": text_feat,
            "itm_logits_pos": model.itm_logits(text_embeds, inputs["attention_mask"], image_embeds),
            "mlm_logits": model.mlm_logits_at(
                inputs["mlm_input_ids"], inputs["attention_mask"], image_embeds
            ),
            "sim_i2t": image_feat @ text_feat.T / model.clamped_temp(),
        }
    return ours, reference["eval"]


@pytest.mark.parametrize(
    "name",
    ["image_embeds", "image_feat", "text_embeds", "text_feat", "itm_logits_pos", "mlm_logits", "sim_i2t"],
)
def test_pretrain_eval_output(pretrain_eval, name):
    ours, reference = pretrain_eval
    assert_parity(ours[name], reference[name], f"pretrain {name}")


def test_pretrain_training_losses_gradients_and_queues(pretrain_dir):
    """ITC/ITM/MLM with distillation from the checkpoint's momentum weights and queues, replaying the recorded
    hard negatives and MLM masks; gradients of the total loss; the enqueued teacher features."""
    reference = load_outputs("pretrain")
    inputs, sampling, train = reference["inputs"], reference["sampling"], reference["train"]
    momentum = load_file(pretrain_dir / MOMENTUM_STATE_FILE)
    teacher = _teacher(AlbefForPreTraining, pretrain_dir, momentum)
    student = AlbefForPreTraining.from_pretrained(pretrain_dir).train()
    batch = {
        "pixel_values": inputs["image"],
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
    }
    masks = {"mlm_input_ids": sampling["mlm_masked_input_ids"], "mlm_labels": sampling["mlm_labels"]}

    teacher_outputs = teacher.compute_teacher_outputs(**batch, **masks)
    output = student(
        **batch,
        **masks,
        teacher_outputs=teacher_outputs,
        image_queue=momentum["image_queue"],
        text_queue=momentum["text_queue"],
        alpha=inputs["alpha"],
        hard_negatives=_recorded_negatives(sampling),
    )
    assert_parity(output.loss_itc, train["loss_ita"], "loss_ita")
    assert_parity(output.loss_itm, train["loss_itm"], "loss_itm")
    assert_parity(output.loss_mlm, train["loss_mlm"], "loss_mlm")
    output.loss.backward()
    _check_gradients(student, train["grads"], "pretrain")

    # The original enqueues the teacher's features at queue_ptr: our queues are its transpose.
    pointer, size = int(momentum["queue_ptr"]), inputs["image"].shape[0]
    assert_parity(
        teacher_outputs.image_feat,
        train["image_queue_after"].T[pointer : pointer + size],
        "enqueued image features",
    )
    assert_parity(
        teacher_outputs.text_feat,
        train["text_queue_after"].T[pointer : pointer + size],
        "enqueued text features",
    )
    assert int(train["queue_ptr_after"]) == pointer + size


# ----------------------------------------------------------------------------------------------
# Retrieval (mscoco.pth / flickr30k.pth layout)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retrieval_eval(retrieval_dir):
    reference = load_outputs("retrieval")
    inputs = reference["inputs"]
    model = AlbefForImageTextRetrieval.from_pretrained(retrieval_dir).eval()
    with torch.no_grad():
        image_embeds = model.encode_image(inputs["image"]).last_hidden_state
        text_embeds = model.encode_text(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
        eval_text_embeds = model.encode_text(
            inputs["eval_text_ids"], inputs["eval_text_atts"]
        ).last_hidden_state
        ranking = model.rank(image_embeds, eval_text_embeds, inputs["eval_text_atts"], k=inputs["k_test"])
        ours = {
            "image_embeds": image_embeds,
            "image_feat": model.project_image(image_embeds),
            "text_embeds": text_embeds,
            "text_feat": model.project_text(text_embeds),
            "itm_logits_pos": model.itm_logits(text_embeds, inputs["attention_mask"], image_embeds),
            "eval_sims_matrix": ranking.sims,
            "eval_score_matrix_i2t": ranking.scores_i2t,
            "eval_score_matrix_t2i": ranking.scores_t2i,
        }
    return ours, reference["eval"]


@pytest.mark.parametrize(
    "name",
    [
        "image_embeds",
        "image_feat",
        "text_embeds",
        "text_feat",
        "itm_logits_pos",
        "eval_sims_matrix",
        "eval_score_matrix_i2t",
        "eval_score_matrix_t2i",
    ],
)
def test_retrieval_eval_output(retrieval_eval, name):
    ours, reference = retrieval_eval
    assert_parity(ours[name], reference[name], f"retrieval {name}")


def test_retrieval_ranking_selects_the_same_candidates(retrieval_eval):
    ours, reference = retrieval_eval
    for name in ("eval_score_matrix_i2t", "eval_score_matrix_t2i"):
        assert torch.equal(ours[name] == -100, reference[name] == -100), name


def test_retrieval_training_losses_and_gradients(retrieval_dir):
    """ITC with image ids and the idx queue, distilled from the teacher (the fixture's momentum copies equal the
    student, see fixtures/albef_original/README.md), and ITM with the recorded hard negatives."""
    reference = load_outputs("retrieval")
    inputs, sampling, train = reference["inputs"], reference["sampling"], reference["train"]
    momentum = load_file(retrieval_dir / MOMENTUM_STATE_FILE)
    teacher = _teacher(AlbefForImageTextRetrieval, retrieval_dir, None)
    student = AlbefForImageTextRetrieval.from_pretrained(retrieval_dir).train()
    batch = {
        "pixel_values": inputs["image"],
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
    }
    output = student(
        **batch,
        idx=inputs["idx"],
        teacher_outputs=teacher.compute_teacher_outputs(**batch),
        image_queue=momentum["image_queue"],
        text_queue=momentum["text_queue"],
        idx_queue=momentum["idx_queue"],
        alpha=inputs["alpha"],
        hard_negatives=_recorded_negatives(sampling),
    )
    assert_parity(output.loss_itc, train["loss_ita"], "loss_ita")
    assert_parity(output.loss_itm, train["loss_itm"], "loss_itm")
    output.loss.backward()
    _check_gradients(student, train["grads"], "retrieval")
    size = inputs["idx"].shape[0]
    assert torch.equal(train["idx_queue_after"].view(-1)[:size], inputs["idx"])
    assert torch.equal(train["idx_queue_after"].view(-1)[size:], momentum["idx_queue"][size:])


# ----------------------------------------------------------------------------------------------
# Grounding (refcoco.pth: retrieval layout, Grad-CAM of the ITM score)
# ----------------------------------------------------------------------------------------------


def _gradcam_per_fusion_block(model, image, input_ids, attention_mask) -> dict[int, dict[str, torch.Tensor]]:
    """The original's ITM Grad-CAM: attention of each fusion block's cross-attention times its clamped gradient
    w.r.t. the ITM "match" logit, masked to the text tokens, averaged over heads and text tokens."""
    image_embeds = model.encode_image(image).last_hidden_state
    output = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        mode="multimodal",
        output_attentions=True,
    )
    itm_logits = model.itm_head(output.last_hidden_state[:, 0, :])
    gradients = torch.autograd.grad(itm_logits[:, 1].sum(), output.cross_attentions)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    mask = attention_mask.view(attention_mask.shape[0], 1, -1, 1, 1)
    maps = {}
    for offset, (attention, gradient) in enumerate(zip(output.cross_attentions, gradients, strict=True)):
        batch, heads, length, _ = attention.shape
        cams = attention[..., 1:].reshape(batch, heads, length, grid, grid) * mask
        grads = gradient[..., 1:].clamp(min=0).reshape(batch, heads, length, grid, grid) * mask
        maps[model.config.fusion_layer + offset] = {
            "gradcam": (cams * grads).mean(1).mean(1).detach(),
            "itm_logits": itm_logits.detach(),
            "attention_map": attention.detach(),
            "attention_grad": gradient,
        }
    return maps


@pytest.mark.parametrize("name", ["gradcam", "itm_logits", "attention_map", "attention_grad"])
def test_grounding_every_fusion_block(grounding_dir, name):
    reference = load_outputs("grounding")
    inputs = reference["inputs"]
    model = AlbefForImageTextRetrieval.from_pretrained(grounding_dir).eval()
    ours = _gradcam_per_fusion_block(model, inputs["image"], inputs["input_ids"], inputs["attention_mask"])
    recorded = reference["eval"]["per_block"]
    assert sorted(ours) == sorted(recorded)
    for block, expected in recorded.items():
        assert_parity(ours[block][name], expected[name], f"grounding block {block} {name}")
        # Grad-CAM values are small (~1e-3): also bound the error relative to the map's scale.
        scale = expected[name].abs().max().item()
        assert_parity(
            ours[block][name] / scale, expected[name] / scale, f"grounding block {block} {name} (relative)"
        )
    primary = reference["eval"]["primary_block_num"]
    assert_parity(ours[primary]["gradcam"], reference["eval"]["gradcam"], "grounding primary Grad-CAM")
