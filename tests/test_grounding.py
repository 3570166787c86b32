"""Tests of albef_hf.grounding: Grad-CAM maps (ITM and ITC) and box scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from albef_hf import (
    AlbefConfig,
    AlbefForImageTextRetrieval,
    box_iou,
    gradcam_itc,
    gradcam_itm,
    grounding_accuracy,
    score_boxes,
    select_box,
    upsample_heatmap,
)

CLS, PAD = 2, 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_with(num_text_layers: int = 4) -> AlbefForImageTextRetrieval:
    config = tiny_config().to_dict()
    config["text_config"]["num_hidden_layers"] = num_text_layers
    torch.manual_seed(0)
    model = AlbefForImageTextRetrieval(AlbefConfig.from_dict(config)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # O(1) weights, so that the maps are far from uniform
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
    return model


def inputs(batch: int = 2, length: int = 6, pad_last_from: int | None = 4):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 56, (batch, length), generator=generator)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    if pad_last_from is not None:
        ids[-1, pad_last_from:], mask[-1, pad_last_from:] = PAD, 0
    return torch.randn(batch, 3, 32, 32, generator=generator), ids, mask


def direct_itm_gradcam(model, pixel_values, ids, mask, layer):
    """The original's formula written out: backward() on a retained attention tensor, explicit loops."""
    image = model.encode_image(pixel_values).last_hidden_state
    fused = model.text_encoder(
        input_ids=ids,
        attention_mask=mask,
        encoder_hidden_states=image,
        mode="multimodal",
        output_attentions=True,
    )
    attention = fused.cross_attentions[layer - model.config.fusion_layer]
    attention.retain_grad()
    model.itm_head(fused.last_hidden_state[:, 0])[:, 1].sum().backward()
    batch, heads, length, _ = attention.shape
    maps = torch.zeros(batch, attention.shape[-1] - 1)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                if mask[b, t]:
                    maps[b] += attention[b, h, t, 1:].detach() * attention.grad[b, h, t, 1:].clamp(min=0)
    model.zero_grad()
    return (maps / (heads * length)).view(batch, 4, 4)


def test_itm_gradcam_equals_a_direct_autograd_computation():
    model = model_with()
    pixel_values, ids, mask = inputs()
    cam = gradcam_itm(model, pixel_values, ids, mask, layer=2)
    assert cam.gradcam.shape == (2, 4, 4) and cam.layer == 2
    assert (cam.gradcam >= 0).all() and cam.gradcam.sum() > 0
    torch.testing.assert_close(cam.gradcam, direct_itm_gradcam(model, pixel_values, ids, mask, 2))
    assert cam.heatmap.shape == (2, 32, 32)
    torch.testing.assert_close(cam.heatmap, upsample_heatmap(cam.gradcam, (32, 32)))
    assert cam.itm_logits.shape == (2, 2) and torch.equal(cam.scores, cam.itm_logits[:, 1])


def test_itm_gradcam_default_layer_is_the_third_fusion_layer():
    model = model_with(num_text_layers=6)  # fusion layers 2..5
    pixel_values, ids, mask = inputs()
    cam = gradcam_itm(model, pixel_values, ids, mask)
    assert cam.layer == 4
    torch.testing.assert_close(cam.gradcam, direct_itm_gradcam(model, pixel_values, ids, mask, 4))
    assert gradcam_itm(model_with(), pixel_values, ids, mask).layer == 3  # only two fusion layers: the last
    with pytest.raises(ValueError, match="fusion layer"):
        gradcam_itm(model, pixel_values, ids, mask, layer=1)


def test_itm_gradcam_ignores_padding_except_for_the_mean():
    model = model_with()
    pixel_values, ids, mask = inputs(batch=1, length=4, pad_last_from=None)
    padded_ids = torch.cat([ids, torch.full((1, 3), PAD)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    short = gradcam_itm(model, pixel_values, ids, mask)
    padded = gradcam_itm(model, pixel_values, padded_ids, padded_mask)
    # padded positions contribute zeros to the mean over text positions, as in the original
    torch.testing.assert_close(padded.gradcam * 7, short.gradcam * 4)


def test_gradcam_leaves_the_model_alone_and_works_when_frozen():
    model = model_with()
    pixel_values, ids, mask = inputs()
    expected = gradcam_itm(model, pixel_values, ids, mask).gradcam
    assert all(param.grad is None for param in model.parameters())
    model.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(gradcam_itm(model, pixel_values, ids, mask).gradcam, expected)
        assert gradcam_itc(model, pixel_values, ids, mask).gradcam.shape == (2, 4, 4)


def test_itc_gradcam_equals_a_direct_autograd_computation():
    model = model_with()
    pixel_values, ids, mask = inputs()
    cam = gradcam_itc(model, pixel_values, ids, mask, layer=0, image_size=(20, 24))
    assert cam.layer == 0 and cam.heatmap.shape == (2, 20, 24)
    assert (cam.gradcam >= 0).all() and cam.gradcam.sum() > 0

    vision = model.encode_image(pixel_values, output_attentions=True)
    attention = vision.attentions[0]
    attention.retain_grad()
    image_feat = F.normalize(model.vision_proj(vision.last_hidden_state[:, 0]), dim=-1)
    text_feat = model.get_text_features(ids, mask)
    (image_feat @ text_feat.T / model.temp).diag().sum().backward()
    cls_row, grad_row = attention[:, :, 0, 1:].detach(), attention.grad[:, :, 0, 1:]
    expected = sum(cls_row[:, h] * grad_row[:, h].clamp(min=0) for h in range(attention.shape[1]))
    torch.testing.assert_close(cam.gradcam, (expected / attention.shape[1]).view(2, 4, 4))
    assert gradcam_itc(model, pixel_values, ids, mask).layer == 1  # block 8, or the last of a shallower ViT


def test_box_scores_are_the_mass_inside_over_sqrt_area():
    heatmap = torch.zeros(10, 12)
    heatmap[2:4, 3:6] = 1.0  # rows 2-3, columns 3-5
    boxes = [(3, 2, 3, 2), (0, 0, 12, 10), (4.5, 2.2, 2, 1), (6, 0, 2, 2)]
    expected = [6 / 6**0.5, 6 / 120**0.5, 2 / 2**0.5, 0.0]  # box 2: row int(2.2) = 2, columns int(4.5) = 4..5
    torch.testing.assert_close(score_boxes(heatmap, boxes), torch.tensor(expected))
    assert select_box(heatmap, boxes) == 0
    torch.testing.assert_close(score_boxes(heatmap, boxes, alpha=1.0)[1], torch.tensor(6 / 120))


def test_box_iou_uses_the_original_pixel_convention():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 10, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (9, 9, 10, 10)) == 0.0  # a single shared pixel is not an intersection


def test_grounding_accuracy_counts_iou_of_at_least_a_half():
    predicted = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10)]
    targets = [(0, 0, 10, 10), (5, 0, 10, 10), (0, 0, 10, 5)]  # IoU 1, 1/3, 1/2
    assert grounding_accuracy(predicted, targets) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        grounding_accuracy(predicted, targets[:2])
