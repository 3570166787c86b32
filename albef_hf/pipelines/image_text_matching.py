"""The `image-text-matching` pipeline: the ITM probability and the ITC similarity of image-text pairs."""

from __future__ import annotations

from typing import Any

from .base import AlbefPipeline, load_image, pair_inputs


class AlbefImageTextMatchingPipeline(AlbefPipeline):
    """Scores image-text pairs: the ITM probability that they match and their ITC cosine similarity.

    Example:
        >>> matcher = pipeline("image-text-matching", model="path/to/albef")
        >>> matcher(image, ["a red circle", "two blue squares"])
        [{'text': 'a red circle', 'itm_probability': 0.97, 'itc_similarity': 0.41}, ...]

    Call with `(image, text)`, an image and a list of texts (or the reverse), two lists of one length (pair i
    is image i with text i), or `{"image": ..., "text": ...}` dicts. One pair gives one dict, otherwise a list.
    """

    checkpoint_classes = ("AlbefForPreTraining", "AlbefForImageTextRetrieval")
    required_methods = (*AlbefPipeline.required_methods, "itm_logits")

    def __call__(self, images: Any, text: str | list[str] | None = None, **kwargs):
        pairs, single = pair_inputs(images, text)
        results = super().__call__(pairs, **kwargs)
        return results[0] if single else results

    def preprocess(self, pair: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        image = load_image(pair["image"], timeout=timeout)
        inputs = self.processor(images=[image], text=[pair["text"]], pairs=True, return_tensors="pt")
        return {**inputs, "text": pair["text"]}

    def _forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        image_embeds, image_feat = self.encode_images(inputs["pixel_values"])
        text_embeds, text_feat = self.encode_texts(inputs["input_ids"], inputs["attention_mask"])
        return {
            "itm_logits": self.model.itm_logits(text_embeds, inputs["attention_mask"], image_embeds),
            "itc_similarity": (image_feat * text_feat).sum(dim=-1),
            "text": inputs["text"],
        }

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": outputs["text"],
            "itm_probability": outputs["itm_logits"].float().softmax(dim=-1)[0, 1].item(),
            "itc_similarity": outputs["itc_similarity"].float()[0].item(),
        }
