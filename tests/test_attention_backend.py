"""The attention implementation chosen for a model reaches the encoders, which read it from the sub-configs."""

from __future__ import annotations

import torch
from conftest import tiny_config

from albef_hf import AlbefForPreTraining, AlbefModel
from albef_hf.modeling_albef_text import _eager_attention


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


def test_set_attn_implementation_reaches_every_sub_config_without_warnings(capfd, caplog):
    from transformers.utils import logging as transformers_logging

    from albef_hf import AlbefForQuestionAnswering
    from albef_hf.modeling_albef_downstream import answer_decoder_config

    config = tiny_config()
    config.decoder_config = answer_decoder_config(config.text_config, num_layers=1)
    model = AlbefForQuestionAnswering(config)
    transformers_logging.enable_propagation()
    try:
        model.set_attn_implementation("eager")
    finally:
        transformers_logging.disable_propagation()
    assert "undefined behavior" not in capfd.readouterr().err + caplog.text
    assert sub_config_implementations(model) | {model.config.decoder_config._attn_implementation} == {"eager"}
    model.set_attn_implementation("sdpa")
    assert sub_config_implementations(model) == {"sdpa"}
    try:
        model.set_attn_implementation("fast")
    except ValueError as error:
        assert "attn_implementation must be" in str(error)
    else:
        raise AssertionError("an unknown implementation was accepted")


def test_eager_attention_in_bf16_gives_the_values_of_a_bf16_softmax():
    """bf16 scores (autocast, or a bf16 model) go through a float32 softmax and back to the values' dtype: the
    same probabilities and outputs as bf16's own softmax (which computes in float32 inside), and close gradients."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(8, 2, 17, 16, generator=generator).bfloat16() for _ in range(3))
    query.requires_grad_()
    module = torch.nn.Module().eval()
    output, probs = _eager_attention(module, query, key, value, None, 0.25)
    output.float().square().sum().backward()
    reference_query = query.detach().clone().requires_grad_()
    reference_probs = (torch.matmul(reference_query, key.transpose(-1, -2)) * 0.25).softmax(dim=-1)
    reference = torch.matmul(reference_probs, value).transpose(1, 2)
    reference.float().square().sum().backward()
    assert probs.dtype == output.dtype == torch.bfloat16
    torch.testing.assert_close(probs, reference_probs, atol=0, rtol=0)
    torch.testing.assert_close(output, reference, atol=0, rtol=0)
    torch.testing.assert_close(query.grad, reference_query.grad, atol=2e-2, rtol=2e-2)
