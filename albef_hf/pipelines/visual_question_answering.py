"""The `visual-question-answering` pipeline: answers ranked over a closed list, or generated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import AlbefPipeline, _as_list, _positive, check_text, pair_inputs


class AlbefVisualQuestionAnsweringPipeline(AlbefPipeline):
    """Answers questions about images with `AlbefForQuestionAnswering`.

    - With `candidate_answers` (a closed answer list, as ALBEF is evaluated on VQA): the answers ranked as the
      original (first-token shortlist of `k`), `top_k` of them (5 by default) as `{"answer", "score"}` with
      `score` the probability renormalised over the shortlist.
    - Without: free generation (`generate_kwargs` go to `model.generate`; `max_new_tokens` 10 by default): one
      answer, or with `top_k > 1` that many from beam search. Results are `{"answer"}` dicts, best first.

    Questions are cleaned as the original cleans them (`pre_question`) unless the processor's normalisation is off.

    Example:
        >>> vqa = pipeline("visual-question-answering", model="path/to/albef-vqa")
        >>> vqa(image, "what colour is the circle?", candidate_answers=["red", "blue", "green"], top_k=2)
        [{'answer': 'red', 'score': 0.93}, {'answer': 'blue', 'score': 0.05}]

    Call with `(image, question)`, lists as in image-text-matching, or `{"image", "question"}` dicts; one question
    gives one list of answers, a list gives a list of lists.
    """

    checkpoint_classes = ("AlbefForQuestionAnswering",)
    required_methods = ("encode_question", "rank_answers", "generate")

    def __call__(self, images: Any, question: str | list[str] | None = None, **kwargs):
        pairs, single = pair_inputs(images, question, text_key="question")
        results = super().__call__(pairs, **kwargs)
        return results[0] if single else results

    def _sanitize_parameters(
        self,
        candidate_answers: Sequence[str] | None = None,
        top_k: int | None = None,
        k: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        max_new_tokens: int | None = None,
        timeout: float | None = None,
    ):
        preprocess, _, _ = super()._sanitize_parameters(timeout=timeout)
        forward, postprocess = {}, {}
        if candidate_answers is not None:
            answers = _as_list(candidate_answers, "candidate answers")
            for position, answer in enumerate(answers):
                check_text(answer, position)
            postprocess["answers"] = answers
            forward["answer_tokens"] = dict(self.processor.tokenize_answers(answers))
        if top_k is not None:
            forward["top_k"] = _positive(top_k, "top_k")
        if k is not None:
            forward["k"] = _positive(k, "k")
        if generate_kwargs is not None or max_new_tokens is not None:
            forward["generate_kwargs"] = {
                **(generate_kwargs or {}),
                **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}),
            }
        return preprocess, forward, postprocess

    def preprocess(self, pair: dict[str, Any], timeout: float | None = None) -> dict[str, torch.Tensor]:
        normalization = self.processor.question_normalization
        question = self.processor(text=[pair["text"]], text_normalization=normalization, return_tensors="pt")
        return {**self.process_image(pair["image"], timeout), **question}

    def _forward(
        self,
        inputs: dict[str, torch.Tensor],
        answer_tokens: dict[str, torch.Tensor] | None = None,
        top_k: int | None = None,
        k: int = 128,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        question = {key: inputs[key] for key in ("pixel_values", "input_ids", "attention_mask")}
        if answer_tokens is not None:
            top_k = top_k or 5
            # rank_answers keeps at most as many candidates as there are answers, and slicing stops there too
            ranking = self.model.rank_answers(
                answer_input_ids=answer_tokens["input_ids"].to(self.device),
                answer_attention_mask=answer_tokens["attention_mask"].to(self.device),
                k=max(k, top_k),
                **question,
            )
            return {"answer_ids": ranking.answer_ids[:, :top_k], "probs": ranking.probs[:, :top_k]}
        generate_kwargs = {"max_new_tokens": 10, **(generate_kwargs or {})}
        if top_k is not None and top_k > 1:
            generate_kwargs.setdefault("num_beams", top_k)
            generate_kwargs["num_return_sequences"] = top_k
        sequences = self.model.generate(**question, **generate_kwargs)
        return {"sequences": sequences.reshape(question["input_ids"].shape[0], -1, sequences.shape[-1])}

    def postprocess(self, outputs: dict[str, Any], answers: list[str] | None = None) -> list[dict[str, Any]]:
        if "sequences" in outputs:
            texts = self.processor.batch_decode(outputs["sequences"][0], skip_special_tokens=True)
            return [{"answer": text.strip()} for text in texts]
        return [
            {"answer": answers[int(index)], "score": float(prob)}
            for index, prob in zip(outputs["answer_ids"][0], outputs["probs"][0].float(), strict=True)
        ]
