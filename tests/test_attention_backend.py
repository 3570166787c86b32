"""The attention implementation chosen for a model reaches the encoders, which read it from the sub-configs."""

from __future__ import annotations

import torch
from conftest import tiny_config

from albef_hf import AlbefForPreTraining, AlbefModel


def sub_config_implementations(model) -> set[str]:
    return {model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation}


def test_sdpa_is_the_default_in_every_sub_config_and_eager_is_selectable(tmp_path):
    model = AlbefModel(tiny_config())
    assert sub_config_implementations(model) == {"sdpa"}
    model.save_pretrained(tmp_path)
    assert sub_config_implementations(AlbefModel.from_pretrained(tmp_path)) == {"sdpa"}
    eager = AlbefForPreTraining.from_pretrained(tmp_path, attn_implementation="eager")
    assert sub_config_implementations(eager) == {"eager"}


def test_sdpa_and_eager_give_the_same_features(batch):
    model = AlbefModel(tiny_config()).eval()
    config = tiny_config()
    config._attn_implementation = "eager"
    eager = AlbefModel(config).eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        out_sdpa, out_eager = model(**batch), eager(**batch)
    torch.testing.assert_close(out_sdpa.text_embeds, out_eager.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_sdpa.image_embeds, out_eager.image_embeds, atol=1e-5, rtol=1e-5)
