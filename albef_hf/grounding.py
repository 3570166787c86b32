"""Weakly-supervised visual grounding with ALBEF: Grad-CAM heatmaps and box scoring.

ALBEF grounds a referring expression without box supervision: the gradient of the image-text matching score
with respect to the cross-attention of one fusion layer, times that attention, shows which patches the match
relies on (`gradcam_itm`, the paper's method: the third fusion layer, layer 8 of ALBEF-base). The ITC variant
(`gradcam_itc`) does the same on a ViT block's [CLS] attention with respect to the contrastive similarity.
Candidate boxes are scored by the heatmap mass inside them divided by sqrt(area) (`score_boxes`,
`select_box`), and a prediction is correct when its IoU with the true box is at least 0.5
(`grounding_accuracy`).

The maps are computed with `output_attentions=True` (eager attention) and `torch.autograd.grad` on the returned
attention probabilities: no hooks and no state left on the model. Run the model in `eval()` mode, as the
original does. Boxes are `(x, y, width, height)` in pixels of the image the heatmap is upsampled to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

__all__ = [
    "AlbefGradCamOutput",
    "box_iou",
    "gradcam_itc",
    "gradcam_itm",
    "grounding_accuracy",
    "score_boxes",
    "select_box",
    "upsample_heatmap",
]


@dataclass
class AlbefGradCamOutput(ModelOutput):
    """Output of `gradcam_itm` / `gradcam_itc`.

    Args:
        gradcam: `(batch, grid, grid)` Grad-CAM map on the patch grid (non-negative).
        heatmap: `(batch, height, width)` the map upsampled bicubically to the image size.
        scores: `(batch,)` the score that was differentiated: the ITM "match" logit of each pair, or the ITC
            similarity of each pair divided by the temperature.
        attentions: the attention probabilities of the chosen layer: cross-attention `(batch, heads, text_len,
            1 + num_patches)` (ITM) or ViT self-attention `(batch, heads, 1 + num_patches, 1 + num_patches)` (ITC).
        attention_grads: the gradient of the summed scores with respect to `attentions`.
        itm_logits: `(batch, 2)` ITM logits of the pairs (ITM mode).
        layer: the text layer (ITM) or ViT block (ITC) the map was taken from.
    """

    gradcam: torch.Tensor | None = None
    heatmap: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    attentions: torch.Tensor | None = None
    attention_grads: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    layer: int | None = None


def gradcam_itm(
    model,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> AlbefGradCamOutput:
    """Grad-CAM of the ITM "match" logit on the cross-attention of a fusion layer, as the original computes it.

    `gradcam = mean over heads and text positions of (attention * clamp(gradient, min=0))`, with the text padding
    masked out (padded positions count as zeros in the mean) and the image [CLS] column dropped.

    Args:
        model: an ALBEF model with an ITM head (`AlbefForImageTextRetrieval`, `AlbefForPreTraining`).
        pixel_values: `(batch, channels, height, width)` images; input_ids, attention_mask: `(batch, text_len)`
            referring expressions, text i about image i.
        layer: text layer index (a fusion layer); default the third fusion layer, `fusion_layer + 2` (8 for
            ALBEF-base, the original's `--block_num 8`), or the last layer of a shallower model.
        image_size: `(height, width)` of the heatmap (default: the input resolution); pass the original image's
            size to score boxes in its pixels.
    """
    text_config = model.config.text_config
    fusion, num_layers = text_config.fusion_layer, text_config.num_hidden_layers
    layer = min(fusion + 2, num_layers - 1) if layer is None else layer
    if not fusion <= layer < num_layers:
        raise ValueError(f"layer must be a fusion layer in [{fusion}, {num_layers}), got {layer}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.enable_grad():
        image_embeds = model.encode_image(pixel_values).last_hidden_state
        fused = model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=_differentiable(image_embeds),
            mode="multimodal",
            output_attentions=True,
        )
        itm_logits = model.itm_head(fused.last_hidden_state[:, 0, :])
        attention = fused.cross_attentions[layer - fusion]
        (grad,) = torch.autograd.grad(itm_logits[:, 1].sum(), attention)
    text_mask = attention_mask[:, None, :, None].to(attention.dtype)
    cam = attention[..., 1:].detach() * text_mask
    positive_grad = grad[..., 1:].clamp(min=0) * text_mask
    gradcam = _to_grid((cam * positive_grad).mean(1).mean(1))
    return AlbefGradCamOutput(
        gradcam=gradcam,
        heatmap=upsample_heatmap(gradcam, image_size or tuple(pixel_values.shape[-2:])),
        scores=itm_logits[:, 1].detach(),
        attentions=attention.detach(),
        attention_grads=grad,
        itm_logits=itm_logits.detach(),
        layer=layer,
    )


def gradcam_itc(
    model,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> AlbefGradCamOutput:
    """Grad-CAM of the ITC similarity on a ViT block's [CLS] attention (the original's `gradcam_mode='itc'`).

    The score of pair i is `image_feat_i . text_feat_i / temp` (the unclamped temperature, as the original);
    `gradcam = mean over heads of (attention of [CLS] to the patches * clamp(gradient, min=0))`.

    Args:
        model: an ALBEF model with projections (`AlbefModel`, `AlbefForImageTextRetrieval`, `AlbefForPreTraining`).
        pixel_values, input_ids, attention_mask: as in `gradcam_itm`.
        layer: ViT block index; default block 8 (the original's default), or the last block of a shallower ViT.
        image_size: `(height, width)` of the heatmap (default: the input resolution).
    """
    num_blocks = model.config.vision_config.num_hidden_layers
    layer = min(8, num_blocks - 1) if layer is None else layer
    if not 0 <= layer < num_blocks:
        raise ValueError(f"layer must be a ViT block in [0, {num_blocks}), got {layer}")
    with torch.no_grad():
        text_feat = model.get_text_features(input_ids, attention_mask)
    with torch.enable_grad():
        vision = model.encode_image(_differentiable(pixel_values), output_attentions=True)
        image_feat = model.project_image(vision.last_hidden_state)
        scores = (image_feat * text_feat).sum(dim=-1) / model.temp
        attention = vision.attentions[layer]
        (grad,) = torch.autograd.grad(scores.sum(), attention)
    cam = attention[:, :, 0, 1:].detach()
    gradcam = _to_grid((cam * grad[:, :, 0, 1:].clamp(min=0)).mean(1))
    return AlbefGradCamOutput(
        gradcam=gradcam,
        heatmap=upsample_heatmap(gradcam, image_size or tuple(pixel_values.shape[-2:])),
        scores=scores.detach(),
        attentions=attention.detach(),
        attention_grads=grad,
        layer=layer,
    )


def _differentiable(tensor: torch.Tensor) -> torch.Tensor:
    # A frozen model still yields attention gradients: the attention then depends on an input that requires them.
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_()


def _to_grid(per_patch: torch.Tensor) -> torch.Tensor:
    grid = int(round(per_patch.shape[-1] ** 0.5))
    if grid * grid != per_patch.shape[-1]:
        raise ValueError(f"{per_patch.shape[-1]} patches do not form a square grid")
    return per_patch.reshape(per_patch.shape[0], grid, grid)


def upsample_heatmap(gradcam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling (align_corners=False, as the original's evaluation) of `(batch, grid, grid)` maps to
    `(batch, height, width)`."""
    return F.interpolate(gradcam[:, None], size=tuple(size), mode="bicubic", align_corners=False)[:, 0]


def score_boxes(heatmap: torch.Tensor, boxes: Sequence[Sequence[float]] | torch.Tensor, alpha: float = 0.5):
    """Score candidate boxes on a `(height, width)` heatmap: the sum inside the box divided by `area ** alpha`.

    A box `(x, y, w, h)` covers rows `int(y) .. int(y + h) - 1` and columns `int(x) .. int(x + w) - 1`, as in the
    original's evaluation (alpha 0.5: divided by sqrt(area)). Returns a `(num_boxes,)` tensor.
    """
    scores = []
    for x, y, w, h in (tuple(float(v) for v in box) for box in boxes):
        inside = heatmap[int(y) : int(y + h), int(x) : int(x + w)]
        scores.append(inside.sum() / (w * h) ** alpha)
    return torch.stack(scores) if scores else heatmap.new_zeros(0)


def select_box(
    heatmap: torch.Tensor, boxes: Sequence[Sequence[float]] | torch.Tensor, alpha: float = 0.5
) -> int:
    """Index of the best-scoring box (the first one on ties).

    The original keeps the first box whose score exceeds the best so far, starting from 0; this returns the same
    box whenever some score is positive, and the best box otherwise (where the original keeps a stale one).
    """
    if len(boxes) == 0:
        raise ValueError("select_box needs at least one candidate box")
    return int(score_boxes(heatmap, boxes, alpha).argmax())


def box_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """Intersection over union of two `(x, y, w, h)` boxes, with the original's inclusive pixel convention
    (corners `x .. x + w - 1`; boxes touching at an edge do not intersect)."""
    inter_x1, inter_y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = 0.0
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def grounding_accuracy(
    predicted: Sequence[Sequence[float]], targets: Sequence[Sequence[float]], threshold: float = 0.5
) -> float:
    """Fraction of predicted boxes whose IoU with the target box is at least `threshold`."""
    if len(predicted) != len(targets):
        raise ValueError(f"got {len(predicted)} predicted boxes for {len(targets)} targets")
    if not predicted:
        raise ValueError("grounding_accuracy needs at least one box")
    hits = sum(box_iou(p, t) >= threshold for p, t in zip(predicted, targets, strict=True))
    return hits / len(predicted)
