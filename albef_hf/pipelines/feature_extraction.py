"""The `feature-extraction` pipeline for ALBEF models: image, text and multimodal features; and the dispatch that
keeps transformers' built-in pipeline for every other model."""

from __future__ import annotations

from typing import Any

import torch
from transformers.pipelines import FeatureExtractionPipeline

from .base import AlbefPipeline, _as_list, _is_batch, check_image, check_text, pair_inputs


class AlbefFeatureExtractionPipeline(AlbefPipeline):
    """ALBEF features of images, texts or image-text pairs, as LAVIS's `extract_features` offers them.

    - images (`extractor(image)`): `image_embeds` `(1 + num_patches, vision_hidden)` tokens and `image_features`
      `(embed_dim,)`, the projected, normalised [CLS] (`model.get_image_features`);
    - texts (`extractor(text="...")`): `text_embeds` `(num_tokens, text_hidden)` unimodal tokens (padding removed)
      and `text_features` `(embed_dim,)`;
    - pairs (`extractor(image, text="...")`): both of the above plus `multimodal_embeds` `(num_tokens,
      text_hidden)`, the fusion encoder's tokens, and `multimodal_features`, their [CLS]
      (`model.get_multimodal_features`).

    Values are numpy float32 arrays, or torch tensors with `return_tensors=True`. One input gives one dict,
    a list gives a list (pairs: as in image-text-matching).
    """

    checkpoint_classes = ("AlbefModel", "AlbefForPreTraining", "AlbefForImageTextRetrieval")
    required_methods = (*AlbefPipeline.required_methods, "fuse")

    def __call__(self, images: Any = None, text: str | list[str] | None = None, **kwargs):
        if images is None and text is None:
            raise ValueError("feature extraction needs images, text=..., or both")
        if images is None:
            single = not _is_batch(text)
            items = [{"text": check_text(t, i)} for i, t in enumerate(_as_list(text, "texts"))]
        elif text is None and not _is_dicts(images):
            single = not _is_batch(images)
            items = _as_list(images, "images")
            for position, image in enumerate(items):
                check_image(image, position)
            items = [{"image": image} for image in items]
        else:
            items, single = pair_inputs(images, text)
        results = super().__call__(items, **kwargs)
        return results[0] if single else results

    def _sanitize_parameters(self, return_tensors: bool | None = None, timeout: float | None = None):
        preprocess, _, _ = super()._sanitize_parameters(timeout=timeout)
        return preprocess, {}, {} if return_tensors is None else {"return_tensors": bool(return_tensors)}

    def preprocess(self, item: dict[str, Any], timeout: float | None = None) -> dict[str, torch.Tensor]:
        inputs = {}
        if "image" in item:
            inputs.update(self.process_image(item["image"], timeout))
        if "text" in item:
            inputs.update(self.process_text(item["text"]))
        return inputs

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = {}
        if "pixel_values" in inputs:
            outputs["image_embeds"], outputs["image_features"] = self.encode_images(inputs["pixel_values"])
        if "input_ids" in inputs:
            mask = inputs["attention_mask"]
            outputs["text_embeds"], outputs["text_features"] = self.encode_texts(inputs["input_ids"], mask)
            outputs["attention_mask"] = mask
        if "pixel_values" in inputs and "input_ids" in inputs:
            fused = self.model.fuse(outputs["text_embeds"], mask, outputs["image_embeds"]).last_hidden_state
            outputs["multimodal_embeds"], outputs["multimodal_features"] = fused, fused[:, 0]
        return outputs

    def postprocess(self, outputs: dict[str, torch.Tensor], return_tensors: bool = False) -> dict[str, Any]:
        length = int(outputs["attention_mask"][0].sum()) if "attention_mask" in outputs else None
        result = {}
        for name, value in outputs.items():
            if name == "attention_mask":
                continue
            value = value[0].float()
            if name in ("text_embeds", "multimodal_embeds"):
                value = value[:length]
            result[name] = value if return_tensors else value.numpy()
        return result


def _is_dicts(value: Any) -> bool:
    return isinstance(value, dict) or (_is_batch(value) and bool(value) and isinstance(value[0], dict))


# ----------------------------------------------------------------------------------------------
# Registration helpers (used by albef_hf/__init__.py; unused where this module serves as remote code)
# ----------------------------------------------------------------------------------------------


class FeatureExtractionDispatch(FeatureExtractionPipeline):
    """transformers' `feature-extraction` task, with ALBEF models served by `AlbefFeatureExtractionPipeline`.

    The built-in task name must keep working for every other model, so this class stands in its registry entry
    and builds the built-in pipeline for any model that is not ALBEF. It also asks `pipeline()` to load a
    processor when the repository has one (ALBEF needs its `AlbefProcessor`; for other models the attempt is
    dropped).
    """

    _load_processor = None

    def __new__(cls, model, *args, processor=None, **kwargs):
        if getattr(model.config, "model_type", None) == "albef":
            return AlbefFeatureExtractionPipeline(model, *args, processor=processor, **kwargs)
        return FeatureExtractionPipeline(model, *args, **kwargs)
