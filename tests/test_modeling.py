"""Model family: outputs, saving and loading, attention back-ends, gradients, losses, sampling."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModel, AutoModelForPreTraining, AutoModelForZeroShotImageClassification

from albef_hf import (
    AlbefConfig,
    AlbefForImageTextRetrieval,
    AlbefForPreTraining,
    AlbefModel,
    AlbefVisionConfig,
    mask_tokens,
    sample_hard_negatives,
)

MODEL_CLASSES = [AlbefModel, AlbefForPreTraining, AlbefForImageTextRetrieval]


def _fixed_draws(batch: dict, config: AlbefConfig) -> dict:
    """Pre-drawn MLM masks and hard negatives, so that two runs see the same random choices."""
    generator = torch.Generator().manual_seed(1)
    text = config.text_config
    masked, labels = mask_tokens(
        batch["input_ids"],
        text.vocab_size,
        text.mask_token_id,
        (text.pad_token_id, text.cls_token_id),
        0.5,
        generator,
    )
    size = batch["input_ids"].shape[0]
    negatives = (torch.roll(torch.arange(size), 1), torch.roll(torch.arange(size), -1))
    return {"mlm_input_ids": masked, "mlm_labels": labels, "hard_negatives": negatives}


def test_default_config_is_albef_base():
    config = AlbefConfig()
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (
        768,
        12,
        16,
        256,
    )
    assert vision.layer_norm_eps == 1e-6
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.fusion_layer) == (
        30522,
        768,
        12,
        6,
    )
    assert (config.embed_dim, config.temp) == (256, 0.07)
    assert config.fusion_layer == 6 and config.image_size == 256


def test_config_shortcuts_and_validation():
    config = AlbefConfig(fusion_layer=3, image_size=384)
    assert config.text_config.fusion_layer == 3 and config.vision_config.image_size == 384
    wide = AlbefConfig(
        vision_config={"hidden_size": 64, "num_attention_heads": 4},
        text_config={"hidden_size": 32, "num_attention_heads": 4},
    )
    assert wide.text_config.encoder_width == 64
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        AlbefConfig(text_config={"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="fusion_layer"):
        AlbefConfig(text_config={"num_hidden_layers": 4, "fusion_layer": 5})


def test_features_are_normalised_and_logits_scaled(batch, config):
    model = AlbefModel(config).eval()
    with torch.no_grad():
        out = model(**batch)
        image_feat = model.get_image_features(batch["pixel_values"])
        text_feat = model.get_text_features(batch["input_ids"], batch["attention_mask"])
    assert image_feat.shape == (4, config.embed_dim)
    torch.testing.assert_close(image_feat.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_feat.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.logits_per_image, image_feat @ text_feat.T / config.temp)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    assert out.image_embeds.shape == (4, 1 + 16, 32)


def test_wrong_image_size_is_a_clear_error(batch, config):
    model = AlbefModel(config).eval()
    with pytest.raises(ValueError, match="does not match the model"):
        model.get_image_features(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model.get_image_features(torch.zeros(1, 1, 32, 32))
    # interpolated position embeddings run the model at another resolution
    assert model.get_image_features(torch.zeros(2, 3, 48, 48), interpolate_pos_encoding=True).shape == (2, 16)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_save_load_round_trip(tmp_path, batch, config, model_class):
    model = model_class(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = model_class.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    with torch.no_grad():
        a = model.get_multimodal_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        b = reloaded.get_multimodal_features(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        )
    assert torch.equal(a, b)


def test_auto_classes_load_albef_folders(tmp_path, batch, config):
    AlbefForPreTraining(config).save_pretrained(tmp_path)
    assert isinstance(AutoModelForPreTraining.from_pretrained(tmp_path), AlbefForPreTraining)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is AlbefModel
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path)) is AlbefModel
    with torch.no_grad():
        assert base(**batch).logits_per_image.shape == (4, 4)


@pytest.mark.parametrize("model_class", [AlbefModel, AlbefForImageTextRetrieval])
def test_sdpa_and_eager_agree(batch, config, model_class):
    sdpa = model_class(config).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert eager.text_encoder.config._attn_implementation == "eager"
    assert eager.vision_model.config._attn_implementation == "eager"
    with torch.no_grad():
        a = sdpa.get_multimodal_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        b = eager.get_multimodal_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            sdpa(**batch).logits_per_image, eager(**batch).logits_per_image, atol=1e-5, rtol=0
        )


def test_attention_maps_when_asked(batch, config):
    model = AlbefModel(config).eval()
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        fused = model.fuse(
            model.encode_text(batch["input_ids"], batch["attention_mask"]).last_hidden_state,
            batch["attention_mask"],
            out.image_embeds,
            output_attentions=True,
        )
    assert len(out.vision_attentions) == 2 and out.vision_attentions[0].shape == (4, 2, 17, 17)
    assert len(out.text_attentions) == config.fusion_layer
    assert len(fused.cross_attentions) == 2 and fused.cross_attentions[0].shape[-1] == 17
    padded = batch["attention_mask"][:, None, None, :] == 0
    assert torch.all(out.text_attentions[0].masked_select(padded.expand_as(out.text_attentions[0])) == 0)
    torch.testing.assert_close(
        fused.cross_attentions[1].sum(-1), torch.ones(fused.cross_attentions[1].shape[:-1])
    )


def _pretraining_grads(model: AlbefForPreTraining, batch: dict, draws: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch, **draws).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(batch, config):
    model = AlbefForPreTraining(config).train()
    draws = _fixed_draws(batch, config)
    reference = _pretraining_grads(model, batch, draws)
    model.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = _pretraining_grads(model, batch, draws)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-5, rtol=0, msg=name)


def test_every_trainable_parameter_gets_a_gradient(batch, config):
    model = AlbefForPreTraining(config).train()
    grads = _pretraining_grads(model, batch, _fixed_draws(batch, config))
    names = {name for name, _ in model.named_parameters()}
    assert names == set(grads), f"no gradient for {sorted(names - set(grads))}"
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_pretraining_losses_decrease_on_an_overfit_batch(batch):
    # A wider initialisation than the default 0.02 makes the four inputs distinguishable from the first step;
    # with 0.02 the first few dozen steps only break the symmetry of near-identical features.
    torch.manual_seed(0)
    config = tiny_config(initializer_range=0.2)
    model = AlbefForPreTraining(config).train()
    draws = _fixed_draws(batch, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(50):
        out = model(**batch, **draws)
        assert all(torch.isfinite(v) for v in (out.loss, out.loss_itc, out.loss_itm, out.loss_mlm))
        first = first or {k: out[k].item() for k in ("loss", "loss_itc", "loss_itm", "loss_mlm")}
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = model(**batch, **draws)
    for key, value in first.items():
        assert last[key].item() < 0.5 * value, f"{key}: {value:.3f} -> {last[key].item():.3f}"


def test_objectives_can_be_switched_off(batch):
    model = AlbefForPreTraining(tiny_config(mlm_weight=0.0, itc_weight=0.0)).train()
    out = model(**batch)
    assert out.loss_mlm is None and out.mlm_logits is None
    torch.testing.assert_close(out.loss, out.loss_itm)


def test_teacher_and_queue_enter_the_contrastive_loss(batch, config):
    model = AlbefForPreTraining(config).train()
    draws = _fixed_draws(batch, config)
    teacher = model.compute_teacher_outputs(
        batch["pixel_values"],
        batch["input_ids"],
        batch["attention_mask"],
        draws["mlm_input_ids"],
        draws["mlm_labels"],
    )
    assert teacher.mlm_logits.shape == (
        (draws["mlm_labels"] != -100).sum().item(),
        config.text_config.vocab_size,
    )
    queue = torch.nn.functional.normalize(torch.randn(8, config.embed_dim), dim=-1)
    out = model(**batch, **draws, teacher_outputs=teacher, image_queue=queue, text_queue=queue, alpha=0.4)
    assert out.logits_per_image.shape == (4, 4 + 8)
    # a teacher identical to the student and alpha 0 gives the in-batch loss plus the queue's negatives only
    no_distill = model(**batch, **draws, teacher_outputs=teacher, alpha=0.0)
    in_batch = model(**batch, **draws)
    torch.testing.assert_close(no_distill.loss_itc, in_batch.loss_itc, atol=1e-5, rtol=0)
    assert not torch.allclose(out.loss_itc, no_distill.loss_itc)
    with pytest.raises(ValueError, match="momentum features"):
        model(**batch, image_queue=queue, text_queue=queue)


def test_retrieval_losses_use_image_ids(batch, config):
    model = AlbefForImageTextRetrieval(config).train()
    idx = torch.tensor([0, 1, 1, 2])
    out = model(**batch, idx=idx)
    assert out.loss_itc is not None and out.itm_logits.shape == (12, 2)
    for text, image in enumerate(out.negative_images.tolist()):
        assert idx[image] != idx[text]


def test_hard_negatives_never_pick_the_positive():
    generator = torch.Generator().manual_seed(0)
    for size in (2, 3, 8):
        sims = torch.randn(size, size + 5) * 10  # sharp similarities: the positive would win if allowed
        sims[:, :size] += torch.eye(size) * 100
        for _ in range(20):
            neg_images, neg_texts = sample_hard_negatives(sims, sims, generator=generator)
            assert torch.all(neg_images != torch.arange(size)) and torch.all(neg_texts != torch.arange(size))


def test_hard_negatives_respect_image_ids():
    generator = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 0, 1, 1, 2, 3])
    sims = torch.randn(6, 6)
    for _ in range(50):
        neg_images, neg_texts = sample_hard_negatives(sims, sims, idx=idx, generator=generator)
        assert torch.all(idx[neg_images] != idx) and torch.all(idx[neg_texts] != idx)
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(sims[:2, :2], sims[:2, :2], idx=torch.tensor([5, 5]))


def test_hard_negative_draw_replays_with_a_generator():
    sims = torch.randn(6, 6)
    a = sample_hard_negatives(sims, sims, generator=torch.Generator().manual_seed(3))
    b = sample_hard_negatives(sims, sims, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_hard_negatives_follow_the_similarity():
    sims = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sims, sims, generator=generator)[1] for _ in range(200)])
    assert (draws[:, 0] == 1).float().mean() > 0.9  # image 0 draws its most similar wrong text
    uniform = torch.stack(
        [sample_hard_negatives(sims, sims, hard=False, generator=generator)[1] for _ in range(400)]
    )
    assert 0.35 < (uniform[:, 0] == 1).float().mean() < 0.65


def test_mlm_masking_statistics_and_special_tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (200, 30))
    ids[:, 0] = 2
    ids[:, 25:] = 0
    masked, labels = mask_tokens(ids, 50, 4, (0, 2), 0.15, generator=generator)
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, 25:].any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    rate = selected[:, 1:25].float().mean().item()
    assert 0.13 < rate < 0.17
    as_mask = (masked[selected] == 4).float().mean().item()
    unchanged = (masked[selected] == ids[selected]).float().mean().item()
    assert 0.76 < as_mask < 0.84 and 0.07 < unchanged < 0.14


def test_rank_with_k_covering_everything_scores_every_pair(batch, config):
    model = AlbefForImageTextRetrieval(config).eval()
    with torch.no_grad():
        images = model.encode_image(batch["pixel_values"]).last_hidden_state
        texts = model.encode_text(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        ranking = model.rank(images, texts, batch["attention_mask"], k=4, batch_size=3)
        brute = torch.stack(
            [
                model.itm_logits(texts, batch["attention_mask"], images[i : i + 1].expand(4, -1, -1))[:, 1]
                for i in range(4)
            ]
        )
        partial = model.rank(images, texts, batch["attention_mask"], k=2)
    torch.testing.assert_close(ranking.scores_i2t, brute, atol=1e-5, rtol=0)
    torch.testing.assert_close(ranking.scores_t2i, brute.T, atol=1e-5, rtol=0)
    assert ((partial.scores_i2t != -100).sum(dim=1) == 2).all()
    top2 = ranking.sims.topk(2, dim=1).indices
    assert torch.all(partial.scores_i2t.gather(1, top2) != -100)


def test_bf16_autocast_on_cpu(batch, config):
    model = AlbefForPreTraining(config).train()
    draws = _fixed_draws(batch, config)
    reference = model(**batch, **draws).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, **draws)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference.item()) < 0.1 * reference.item()
    assert model.vision_proj.weight.grad is not None


def test_the_conv_stem_is_an_option_that_keeps_the_token_grid(tmp_path):
    plain = AlbefModel(tiny_config())
    assert not any(
        "stem" in key for key in plain.state_dict()
    )  # default: ViT's patch embedding, as converted
    config = tiny_config()
    config.vision_config.conv_stem_channels = [4, 8]  # two halvings, then proj covers 8 / 4 = 2 pixels
    model = AlbefModel(AlbefConfig.from_dict(config.to_dict()))
    assert model.vision_model.patch_embed.proj.kernel_size == (2, 2)
    tokens = model.encode_image(torch.randn(2, 3, 32, 32)).last_hidden_state
    assert tokens.shape == (2, 1 + 16, 32)
    tokens.sum().backward()
    assert model.vision_model.patch_embed.stem[0].conv.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = AlbefModel.from_pretrained(tmp_path)
    assert loaded.config.vision_config.conv_stem_channels == [4, 8]
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("channels", [[4, 8, 16, 32], [], [4, 0]])
def test_a_conv_stem_that_does_not_fit_is_refused(channels):
    with pytest.raises(ValueError, match="conv_stem_channels|patch_size"):
        AlbefVisionConfig(image_size=32, patch_size=8, conv_stem_channels=channels)
