"""from_vision_text_pretrained: weights of a saved ViT and a saved BERT land in the right places."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_tokenizer
from transformers import BertConfig, BertForMaskedLM, BertModel, ViTConfig, ViTModel

from albef_hf import AlbefForPreTraining, AlbefModel

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
