"""Processor of ALBEF: the image processor plus a BERT tokenizer, with the original text normalisation.

`pre_caption` / `pre_question` reproduce the original ALBEF text cleaning. With
`original_tokenization=True` a sentence is encoded as the original's tokenizer does: "[CLS] tokens", with
no trailing [SEP], truncated to `max_length` tokens including [CLS]. Converted checkpoints need it; models
trained with this package may use either form, as long as training and inference agree.
"""

from __future__ import annotations

import re
from typing import Any

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

__all__ = ["AlbefProcessor", "pre_caption", "pre_question"]

_PUNCTUATION = re.compile(r"""[,.'!?"()*#:;~]""")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """The original caption cleaning: lowercase; drop `, . ' ! ? " ( ) * # : ; ~`; `-` and `/` become spaces;
    `<person>` becomes `person`; runs of whitespace collapse; keep at most `max_words` words."""
    caption = (
        _PUNCTUATION.sub("", caption.lower())
        .replace("-", " ")
        .replace("/", " ")
        .replace("<person>", "person")
    )
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def pre_question(question: str, max_words: int = 30) -> str:
    """The original question cleaning: as `pre_caption` but whitespace is not collapsed, only trailing spaces
    are removed, and `<person>` is kept (the original differs in exactly these ways)."""
    question = _PUNCTUATION.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


_NORMALIZERS = {"caption": pre_caption, "question": pre_question}


class AlbefProcessor(ProcessorMixin):
    r"""Prepares images and texts for ALBEF models.

    Args:
        image_processor: an `AlbefImageProcessor`.
        tokenizer: a BERT tokenizer (bert-base-uncased for the released checkpoints).
        max_length: longest tokenised text, special tokens included (30 as in the original retrieval code;
            its pretraining used 25).
        max_words: texts are cut to this many words before tokenisation (30 in the original).
        text_normalization: `"caption"` (original `pre_caption`), `"question"` (`pre_question`) or `None`.
        original_tokenization: encode "[CLS] tokens" with no trailing [SEP], as the original ALBEF tokenizer.

    Example:
        >>> processor = AlbefProcessor(AlbefImageProcessor(size=256), tokenizer, original_tokenization=True)
        >>> batch = processor(images=[image], text=["A dog, running!"], pairs=True)
        >>> sorted(batch.keys())
        ['attention_mask', 'input_ids', 'pixel_values']
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        max_length: int = 30,
        max_words: int = 30,
        text_normalization: str | None = "caption",
        original_tokenization: bool = False,
        **kwargs: Any,
    ) -> None:
        if text_normalization not in (None, *_NORMALIZERS):
            raise ValueError(f"text_normalization must be None or one of {sorted(_NORMALIZERS)}")
        self.max_length = max_length
        self.max_words = max_words
        self.text_normalization = text_normalization
        self.original_tokenization = original_tokenization
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        pairs: bool = False,
        padding: bool | str = "longest",
        max_length: int | None = None,
        text_normalization: str | None = "default",
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process images and/or texts.

        Args:
            images: an image or a list of images (PIL, numpy, torch or paths).
            text: a string or a list of strings.
            pairs: images and texts form pairs (image i with text i): their counts must match.
            padding: tokenizer padding (`"longest"` by default, `"max_length"` pads to `max_length`).
            max_length: override the instance's `max_length` for this call.
            text_normalization: override the instance's normalisation for this call.
            return_tensors: `"pt"` (default), `"np"` or `None`.
            kwargs: passed to the image processor.

        Returns:
            A `BatchFeature` with `pixel_values` and/or `input_ids` and `attention_mask`.

        Raises:
            ValueError: on no input, an empty list, an empty text, a non-image, or mismatched pair counts.
        """
        if images is None and text is None:
            raise ValueError("AlbefProcessor needs `images`, `text`, or both")
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self.tokenize(text, padding, max_length, text_normalization, return_tensors))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **kwargs))
        if pairs and images is not None and text is not None:
            num_images = len(images) if isinstance(images, (list, tuple)) else 1
            num_texts = len(text) if isinstance(text, (list, tuple)) else 1
            if num_images != num_texts:
                raise ValueError(
                    f"image i pairs with text i, but got {num_images} images and {num_texts} texts"
                )
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def question_normalization(self) -> str | None:
        """The normalisation of questions (VQA): `"question"` (`pre_question`), or None when this processor
        normalises nothing (converted checkpoints with `text_normalization=None` keep their texts as given)."""
        return None if self.text_normalization is None else "question"

    def normalize(self, texts: list[str], text_normalization: str | None = "default") -> list[str]:
        """Apply the configured text normalisation to a list of texts."""
        mode = self.text_normalization if text_normalization == "default" else text_normalization
        if mode is None:
            return list(texts)
        if mode not in _NORMALIZERS:
            raise ValueError(
                f"text_normalization must be None or one of {sorted(_NORMALIZERS)}, got {mode!r}"
            )
        return [_NORMALIZERS[mode](text, self.max_words) for text in texts]

    def tokenize(
        self,
        text: str | list[str],
        padding: bool | str = "longest",
        max_length: int | None = None,
        text_normalization: str | None = "default",
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """Normalise and tokenise texts into `input_ids` and `attention_mask` (no token type ids)."""
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if not texts:
            raise ValueError("got an empty list of texts")
        texts = self.normalize(list(texts), text_normalization)
        for position, cleaned in enumerate(texts):
            if not cleaned.strip():
                raise ValueError(f"text {position} is empty (after normalisation)")
        max_length = max_length or self.max_length
        if not self.original_tokenization:
            encoded = self.tokenizer(
                texts, padding=padding, truncation=True, max_length=max_length, return_token_type_ids=False
            )
        else:
            # The original tokenizer emits "[CLS] tokens": no [SEP], and [CLS] counts towards max_length.
            body = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length - 1)
            ids = [[self.tokenizer.cls_token_id, *row] for row in body["input_ids"]]
            encoded = self.tokenizer.pad(
                {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]},
                padding=padding,
                max_length=max_length,
            )
        return BatchFeature(
            data={"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]},
            tensor_type=return_tensors,
        )

    def tokenize_answers(
        self,
        answers: str | list[str],
        max_length: int | None = None,
        padding: bool | str = "longest",
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Encode VQA answers as `AlbefForQuestionAnswering` scores them: "[CLS] answer [SEP]".

        The original appends "[SEP]" to each answer as its end token and its tokenizer prepends [CLS], so this is
        the form with or without `original_tokenization` (and what the standard BERT template gives). Answers are
        not normalised, as in the original. Training (the collator), answer-list ranking and `generate` (which
        starts from [CLS] and stops at [SEP]) all use this form.

        Args:
            answers: an answer or a list of answers.
            max_length: longest encoding, [CLS] and [SEP] included (default: the processor's `max_length`).
            padding, return_tensors: as in `tokenize`.
        """
        answers = [answers] if isinstance(answers, str) else list(answers)
        if not answers or not all(isinstance(answer, str) and answer.strip() for answer in answers):
            raise ValueError(f"answers must be non-empty strings, got {answers!r}")
        encoded = self.tokenizer(
            answers,
            padding=padding,
            truncation=True,
            max_length=max_length or self.max_length,
            return_token_type_ids=False,
        )
        return BatchFeature(
            data={"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]},
            tensor_type=return_tensors,
        )

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Forwarded to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Forwarded to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
