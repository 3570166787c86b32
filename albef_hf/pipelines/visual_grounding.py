"""The `visual-grounding` pipeline: where in the image a text is, by Grad-CAM, and the best of candidate boxes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..grounding import gradcam_itc, gradcam_itm, score_boxes, upsample_heatmap
from .base import AlbefPipeline, _as_list, _is_batch, load_image, pair_inputs


class AlbefVisualGroundingPipeline(AlbefPipeline):
    """Where in the image a referring expression is: ALBEF's weakly-supervised grounding by Grad-CAM.

    Each result has `heatmap`, a float32 `(height, width)` array over the input image's pixels (the Grad-CAM map
    of the ITM "match" logit on a fusion layer's cross-attention, upsampled bicubically), `overlay`, the image
    with the normalised heatmap blended over it (a PIL image), and `score`, the score the map explains (the ITM
    "match" logit; with `mode="itc"`, the ITC similarity over the temperature and a ViT block's map). Given
    candidate `boxes` (`[x, y, width, height]` in the image's pixels), it also has `box`, the chosen box,
    `box_index` and `box_scores` (heatmap mass in each box over the square root of its area, as the original).

    Example:
        >>> grounder = pipeline("visual-grounding", model="path/to/albef")
        >>> result = grounder(image, "the red circle", boxes=[[0, 0, 32, 32], [32, 0, 32, 32]])
        >>> result["box"], result["overlay"].save("where.png")

    Call with `(image, text)`, lists as in image-text-matching, or `{"image", "text", "boxes"}` dicts (boxes
    per image); `boxes=` applies to every image of the call.
    """

    checkpoint_classes = ("AlbefForPreTraining", "AlbefForImageTextRetrieval")
    required_methods = ("encode_image", "text_encoder", "itm_head")

    def __call__(self, images: Any, text: str | list[str] | None = None, **kwargs):
        pairs, single = pair_inputs(images, text)
        if text is None:
            for pair, item in zip(pairs, _as_list(images, "inputs"), strict=True):
                if "boxes" in item:
                    pair["boxes"] = _check_boxes(item["boxes"])
        results = super().__call__(pairs, **kwargs)
        return results[0] if single else results

    def _sanitize_parameters(
        self,
        boxes: Sequence[Sequence[float]] | None = None,
        mode: str | None = None,
        layer: int | None = None,
        alpha: float | None = None,
        timeout: float | None = None,
    ):
        preprocess, _, _ = super()._sanitize_parameters(timeout=timeout)
        if boxes is not None:
            preprocess["boxes"] = _check_boxes(boxes)
        forward = {} if layer is None else {"layer": layer}
        if mode is not None:
            if mode not in ("itm", "itc"):
                raise ValueError(f"mode must be 'itm' or 'itc', got {mode!r}")
            forward["mode"] = mode
        postprocess = {} if alpha is None else {"alpha": float(alpha)}
        return preprocess, forward, postprocess

    def preprocess(
        self, pair: dict[str, Any], boxes: list[list[float]] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        image = load_image(pair["image"], timeout=timeout)
        inputs = self.processor(images=[image], text=[pair["text"]], pairs=True, return_tensors="pt")
        return {**inputs, "image": image, "boxes": pair.get("boxes", boxes)}

    def _forward(self, inputs: dict[str, Any], mode: str = "itm", layer: int | None = None) -> dict[str, Any]:
        gradcam = gradcam_itm if mode == "itm" else gradcam_itc
        cam = gradcam(
            self.model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], layer=layer
        )
        return {
            "gradcam": cam.gradcam,
            "score": cam.scores,
            "image": inputs["image"],
            "boxes": inputs["boxes"],
        }

    def postprocess(self, outputs: dict[str, Any], alpha: float = 0.5) -> dict[str, Any]:
        image = outputs["image"]
        heatmap = upsample_heatmap(outputs["gradcam"].float(), (image.height, image.width))[0]
        result = {
            "heatmap": heatmap.numpy(),
            "overlay": overlay_heatmap(image, heatmap.numpy()),
            "score": outputs["score"].float()[0].item(),
        }
        if outputs["boxes"] is not None:
            scores = score_boxes(heatmap, outputs["boxes"], alpha)
            best = int(scores.argmax())
            result.update(box=list(outputs["boxes"][best]), box_index=best, box_scores=scores.tolist())
        return result


def _check_boxes(boxes: Any) -> list[list[float]]:
    if not _is_batch(boxes) or not boxes:
        raise ValueError(f"boxes must be a non-empty list of [x, y, width, height], got {boxes!r}")
    checked = []
    for position, box in enumerate(boxes):
        values = list(box) if _is_batch(box) or isinstance(box, (np.ndarray, torch.Tensor)) else None
        if values is None or len(values) != 4:
            raise ValueError(f"box {position}: expected [x, y, width, height], got {box!r}")
        values = [float(v) for v in values]
        if values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"box {position}: width and height must be positive, got {box!r}")
        checked.append(values)
    return checked


def overlay_heatmap(image: PIL.Image.Image, heatmap: np.ndarray, opacity: float = 0.5) -> PIL.Image.Image:
    """`image` with `heatmap` (same size, normalised to its maximum) blended over it in a blue-to-red colour map."""
    peak = float(heatmap.max())
    level = heatmap / peak if peak > 0 else np.zeros_like(heatmap)
    # a "jet"-like map: blue (low) -> cyan -> yellow -> red (high)
    colours = np.stack([np.clip(1.5 - np.abs(4 * level - offset), 0, 1) for offset in (3, 2, 1)], axis=-1)
    heat = PIL.Image.fromarray((colours * 255).astype(np.uint8))
    return PIL.Image.blend(image.convert("RGB"), heat, opacity)
