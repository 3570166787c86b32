"""Image-text retrieval evaluation as the original ALBEF does it.

1. Encode every image and every text once (unimodal encoders).
2. Rank all pairs by ITC similarity; re-rank the top `k` candidates of each query with the ITM "match"
   logit (`rank` of the matching models); every other candidate scores -100.
3. Recall@1/5/10 in both directions with multi-caption ground truth (`itm_eval`): an image query is
   correct at K when any of its captions is among the top K texts; a text query when its image is among
   the top K images.

Step 2 is split across processes by query rows (each process re-ranks a contiguous block of image rows
and of text rows, as the original), and the blocks are summed back together with an all-reduce.

The downstream evaluations live here too, each split across processes by blocks of samples:

- VQA (`predict_vqa`, `evaluate_vqa`): answers ranked from a closed list as the original
  (`AlbefForQuestionAnswering.rank_answers`: first-token shortlist of k, then full likelihood), with the
  top answers and their probabilities, or generated freely; scored with the VQA soft score (`vqa_score`).
- Grounding (`predict_grounding`, `evaluate_grounding`): Grad-CAM heatmaps (`albef_hf.grounding`), the
  best candidate box by mass / sqrt(area), correct at IoU >= 0.5.
- NLVR2 and SNLI-VE are plain classification: `AlbefTrainer` runs transformers' evaluation loop with
  `classification_metrics`.

Every metric is in percent, as the retrieval recalls are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .grounding import box_iou, gradcam_itc, gradcam_itm, select_box, upsample_heatmap
from .image_processing_albef import to_pil_rgb
from .modeling_albef_text import text_lengths

__all__ = [
    "GroundingEvalSet",
    "RetrievalEvalSet",
    "VqaEvalSet",
    "classification_metrics",
    "compute_retrieval_scores",
    "encode_texts_by_length",
    "evaluate_grounding",
    "evaluate_retrieval",
    "evaluate_vqa",
    "grounding_metrics",
    "itm_eval",
    "predict_grounding",
    "predict_vqa",
    "retrieval_eval_set_from_samples",
    "vqa_metrics",
    "vqa_score",
]


@dataclass
class RetrievalEvalSet:
    """A retrieval test set in the shape of ALBEF's COCO/Flickr30K evaluation.

    Attributes:
        images: `N` images (PIL, arrays or paths: whatever the processor takes).
        texts: the captions of all images.
        txt2img: `txt2img[t]` is the index of the image of text `t`.
        img2txt: `img2txt[i]` lists the indices of the texts of image `i`.
    """

    images: Sequence[Any]
    texts: Sequence[str]
    txt2img: Sequence[int]
    img2txt: Sequence[Sequence[int]]

    def __post_init__(self) -> None:
        if len(self.txt2img) != len(self.texts) or len(self.img2txt) != len(self.images):
            raise ValueError(
                f"txt2img needs one entry per text ({len(self.txt2img)} vs {len(self.texts)}) and img2txt one per "
                f"image ({len(self.img2txt)} vs {len(self.images)})"
            )
        if not self.images or not self.texts:
            raise ValueError("a retrieval evaluation set needs at least one image and one text")


def retrieval_eval_set_from_samples(samples: Any) -> RetrievalEvalSet:
    """Group reader samples (`{"image", "text", "image_id"}`, one per caption) by `image_id`.

    Images are kept in order of first appearance (one image per id); texts in sample order. Objects that
    already have `images`, `texts`, `txt2img` and `img2txt` (like the synthetic world's `RetrievalEval`) are
    returned as a `RetrievalEvalSet` unchanged.
    """
    if all(hasattr(samples, name) for name in ("images", "texts", "txt2img", "img2txt")):
        return RetrievalEvalSet(samples.images, samples.texts, samples.txt2img, samples.img2txt)
    images, texts, txt2img, img2txt = [], [], [], []
    position: dict[int, int] = {}
    for sample in samples:
        missing = {"image", "text", "image_id"} - set(sample)
        if missing:
            raise ValueError(
                f"a retrieval evaluation sample needs {sorted(missing)}; got keys {sorted(sample)}"
            )
        image_id = int(sample["image_id"])
        if image_id not in position:
            position[image_id] = len(images)
            images.append(sample["image"])
            img2txt.append([])
        img2txt[position[image_id]].append(len(texts))
        txt2img.append(position[image_id])
        texts.append(sample["text"])
    return RetrievalEvalSet(images, texts, txt2img, img2txt)


def _best_ranks(scores: np.ndarray, positives: Sequence[Sequence[int]], chunk: int = 1024) -> np.ndarray:
    """Per query row, the best (lowest) 0-based position of any of its positives when the row is sorted
    as the original sorts it: `np.argsort(score)[::-1]` (ties broken exactly as there)."""
    ranks = np.empty(scores.shape[0])
    for start in range(0, scores.shape[0], chunk):
        block = scores[start : start + chunk]
        order = np.argsort(block, axis=1)[:, ::-1]
        position = np.empty_like(order)
        np.put_along_axis(position, order, np.arange(block.shape[1])[None, :], axis=1)
        for row in range(block.shape[0]):
            ranks[start + row] = position[row, list(positives[start + row])].min()
    return ranks


def itm_eval(
    scores_i2t: np.ndarray | torch.Tensor,
    scores_t2i: np.ndarray | torch.Tensor,
    txt2img: Sequence[int],
    img2txt: Sequence[Sequence[int]],
) -> dict[str, float]:
    """Retrieval recall in percent, as the original's `itm_eval`.

    Args:
        scores_i2t: `(num_images, num_texts)` scores of every text for every image query.
        scores_t2i: `(num_texts, num_images)` scores of every image for every text query.
        txt2img: the image index of each text.
        img2txt: the text indices of each image (several captions per image).

    Returns:
        `txt_r1, txt_r5, txt_r10` (text retrieval: image queries, correct when any of the image's captions
        ranks within K), `txt_r_mean`, `img_r1, img_r5, img_r10` (image retrieval: text queries),
        `img_r_mean`, and `r_mean` (the mean of the two means).
    """
    scores_i2t = np.asarray(scores_i2t.cpu() if isinstance(scores_i2t, torch.Tensor) else scores_i2t)
    scores_t2i = np.asarray(scores_t2i.cpu() if isinstance(scores_t2i, torch.Tensor) else scores_t2i)
    if scores_i2t.shape != (len(img2txt), len(txt2img)) or scores_t2i.shape != (len(txt2img), len(img2txt)):
        raise ValueError(
            f"score shapes {scores_i2t.shape} / {scores_t2i.shape} do not match {len(img2txt)} images and "
            f"{len(txt2img)} texts"
        )
    text_ranks = _best_ranks(scores_i2t, img2txt)
    image_ranks = _best_ranks(scores_t2i, [[int(i)] for i in txt2img])

    def recall(ranks: np.ndarray, k: int) -> float:
        return 100.0 * float((ranks < k).sum()) / len(ranks)

    metrics = {f"txt_r{k}": recall(text_ranks, k) for k in (1, 5, 10)}
    metrics["txt_r_mean"] = (metrics["txt_r1"] + metrics["txt_r5"] + metrics["txt_r10"]) / 3
    metrics.update({f"img_r{k}": recall(image_ranks, k) for k in (1, 5, 10)})
    metrics["img_r_mean"] = (metrics["img_r1"] + metrics["img_r5"] + metrics["img_r10"]) / 3
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def _process_rows(count: int, rank: int, world_size: int) -> slice:
    """This process's block of query rows, split as the original splits them."""
    step = count // world_size + 1
    start = rank * step
    return slice(min(start, count), min(count, start + step))


def _sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def compute_retrieval_scores(
    model: Any,
    processor: Any,
    eval_set: RetrievalEvalSet,
    k: int = 128,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = _sum_across_processes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC ranking + ITM re-ranking scores of every image against every text (see the module docstring).

    Args:
        model: an ALBEF model with an ITM head (`AlbefForImageTextRetrieval` or `AlbefForPreTraining`).
        processor: an `AlbefProcessor`; images get its (evaluation) image processing and texts are padded to
            its `max_length`.
        eval_set: images, texts and ground truth.
        k: candidates re-ranked with ITM per query (256 for COCO, 128 for Flickr30K in the original).
        batch_size: images/texts per encoder forward and pairs per ITM forward.
        device: where to run (default: the model's device).
        rank, world_size: this process's share of the re-ranking (default: from torch.distributed, else 0/1).
        reduce: combines the per-process blocks (sum over processes).

    Returns:
        `(scores_i2t, scores_t2i)`, float tensors on the CPU, complete on every process.
    """
    if not hasattr(model, "rank"):
        raise TypeError(f"{type(model).__name__} has no ITM head; retrieval evaluation needs one")
    distributed = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
    world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
    device = _model_device(model, device)
    with _eval_mode(model):
        image_embeds = torch.cat(
            [
                model.encode_image(
                    processor(images=list(eval_set.images[start : start + batch_size]))["pixel_values"].to(
                        device
                    )
                ).last_hidden_state
                for start in range(0, len(eval_set.images), batch_size)
            ]
        )
        texts = processor.tokenize(list(eval_set.texts), padding="max_length")
        text_embeds, attention_mask = encode_texts_by_length(
            model, texts["input_ids"].to(device), texts["attention_mask"].to(device), batch_size
        )
        image_rows = _process_rows(image_embeds.shape[0], rank, world_size)
        text_rows = _process_rows(text_embeds.shape[0], rank, world_size)
        ranking = model.rank(image_embeds, text_embeds, attention_mask, k, batch_size, image_rows, text_rows)
    scores = []
    for matrix, rows in ((ranking.scores_i2t, image_rows), (ranking.scores_t2i, text_rows)):
        own = torch.zeros_like(matrix, dtype=torch.float32)
        own[rows] = matrix[rows].float()
        scores.append(reduce(own).cpu())
    return scores[0], scores[1]


@torch.no_grad()
def encode_texts_by_length(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unimodal text tokens of many texts, encoded `batch_size` at a time in order of length, each batch cut to
    its longest text (padding is the larger part of most caption batches padded to a fixed length).

    Returns:
        `(text_embeds, attention_mask)`: `(num_texts, longest, text_hidden)` and `(num_texts, longest)` in the
        order of the input, cut to the longest text; positions past a text's end are masked.
    """
    lengths = text_lengths(attention_mask)
    longest = int(lengths.max())
    attention_mask = attention_mask[:, :longest]
    order = torch.argsort(lengths, stable=True)
    text_embeds = None
    for start in range(0, order.numel(), batch_size):
        rows = order[start : start + batch_size]
        length = int(lengths[rows].max())
        states = model.encode_text(input_ids[rows, :length], attention_mask[rows, :length]).last_hidden_state
        if text_embeds is None:
            text_embeds = states.new_zeros(order.numel(), longest, states.shape[-1])
        text_embeds[rows, :length] = states
    return text_embeds, attention_mask


def evaluate_retrieval(
    model: Any,
    processor: Any,
    eval_set: Any,
    k: int = 128,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 in both directions and their means, as the original's retrieval evaluation.

    `eval_set` is a `RetrievalEvalSet`, anything with the same four attributes, or reader samples (grouped
    with `retrieval_eval_set_from_samples`). Runs on every process and splits the ITM re-ranking among them.
    """
    eval_set = retrieval_eval_set_from_samples(eval_set)
    scores_i2t, scores_t2i = compute_retrieval_scores(model, processor, eval_set, k, batch_size, device)
    return itm_eval(scores_i2t.numpy(), scores_t2i.numpy(), eval_set.txt2img, eval_set.img2txt)


# ----------------------------------------------------------------------------------------------
# Downstream tasks
# ----------------------------------------------------------------------------------------------


def _process_share(count: int) -> tuple[slice, bool]:
    """This process's contiguous block of `count` samples, and whether results must be gathered."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return slice(0, count), False
    return _process_rows(count, dist.get_rank(), dist.get_world_size()), True


def _gather_lists(own: list[Any]) -> list[Any]:
    """Concatenate every process's list in rank order (the blocks of `_process_share`)."""
    gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, own)
    return [item for block in gathered for item in block]


@contextmanager
def _eval_mode(model: Any):
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _model_device(model: Any, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _in_batches(samples: Sequence[Any], rows: slice, batch_size: int):
    for start in range(rows.start, rows.stop, batch_size):
        yield [samples[i] for i in range(start, min(start + batch_size, rows.stop))]


def classification_metrics(eval_prediction: Any) -> dict[str, float]:
    """`compute_metrics` of NLVR2 / SNLI-VE: `accuracy` (percent) of the arg-max of the logits."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": 100.0 * float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


@dataclass
class VqaEvalSet:
    """VQA test questions and the closed answer list they are answered from.

    Attributes:
        samples: VQA samples (`albef_hf.data.downstream`): `{"image", "text": question}` plus, to be scored,
            `"answers"` (the annotators' answers, repeats kept: the soft score counts them), and optionally
            `"question_id"` and `"question_type"` (scores are also reported per type).
        answer_list: the candidate answers (the original's answer_list.json); None answers by generation.
    """

    samples: Sequence[dict[str, Any]]
    answer_list: Sequence[str] | None = None

    def __len__(self) -> int:
        return len(self.samples)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """The VQA soft score of one answer: `min(1, matches / 3)` against several annotators' answers, where
    `matches` counts the answers equal to the prediction (after lower-casing and stripping); with a single answer,
    1 for an exact match, else 0.

    The official VQA v2 metric further averages over the 10 leave-one-out subsets of annotators and normalises
    punctuation, articles and number words; this is the simplified form.
    """
    predicted = prediction.strip().lower()
    matches = sum(predicted == answer.strip().lower() for answer in answers)
    if len(answers) == 1:
        return float(matches)
    return min(1.0, matches / 3.0)


@torch.no_grad()
def predict_vqa(
    model: Any,
    processor: Any,
    eval_set: VqaEvalSet,
    k: int = 128,
    top_k: int = 5,
    generate: bool = False,
    generate_kwargs: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Answer every question of `eval_set` (split across processes, complete on each).

    Args:
        model: an `AlbefForQuestionAnswering`.
        processor: its `AlbefProcessor`; questions are cleaned with `pre_question` unless its normalisation is off.
        eval_set: the questions and the answer list.
        k: answers kept by the first-token shortlist before full scoring (the original's `k_test`, 128).
        top_k: answers returned per question, with probabilities renormalised over the shortlist.
        generate: answer by `model.generate` (free text) instead of ranking the list (also when there is no list).
        generate_kwargs: for `generate` (default `max_new_tokens=10`, greedy).
        batch_size: questions per forward.
        device: where to run (default: the model's device).

    Returns:
        One dict per question, in order: `index`, `question_id` (when the sample has one), `answer`, and
        `top_answers` (`[{"answer", "probability"}]`, best first; ranking only).
    """
    device = _model_device(model, device)
    generate = generate or eval_set.answer_list is None
    answers = None
    if not generate:
        answer_list = list(eval_set.answer_list)
        answers = {key: value.to(device) for key, value in processor.tokenize_answers(answer_list).items()}
        k = min(k, len(answer_list))
    normalization = processor.question_normalization
    rows, gathered = _process_share(len(eval_set.samples))
    results, index = [], rows.start
    with _eval_mode(model):
        for batch in _in_batches(eval_set.samples, rows, batch_size):
            inputs = processor(
                images=[sample["image"] for sample in batch],
                text=[sample["text"] for sample in batch],
                text_normalization=normalization,
            )
            inputs = {key: value.to(device) for key, value in inputs.items()}
            if generate:
                sequences = model.generate(**inputs, **{"max_new_tokens": 10, **(generate_kwargs or {})})
                texts = processor.batch_decode(sequences, skip_special_tokens=True)
                predicted = [[(text.strip(), None)] for text in texts]
            else:
                ranking = model.rank_answers(
                    answer_input_ids=answers["input_ids"],
                    answer_attention_mask=answers["attention_mask"],
                    k=k,
                    **inputs,
                )
                predicted = [
                    [(answer_list[int(i)], float(p)) for i, p in zip(ids[:top_k], probs[:top_k], strict=True)]
                    for ids, probs in zip(ranking.answer_ids, ranking.probs.float(), strict=True)
                ]
            for sample, candidates in zip(batch, predicted, strict=True):
                result = {"index": index, "answer": candidates[0][0]}
                for key in ("question_id", "question_type"):
                    if sample.get(key) is not None:
                        result[key] = sample[key]
                if sample.get("answers"):
                    result["score"] = vqa_score(result["answer"], sample["answers"])
                if not generate:
                    result["top_answers"] = [{"answer": a, "probability": p} for a, p in candidates]
                results.append(result)
                index += 1
    return _gather_lists(results) if gathered else results


def vqa_metrics(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`vqa_score` (percent, over the questions that have answers: predictions with a `score`) and
    `vqa_score_<type>` per `question_type`."""
    scores: dict[str, list[float]] = {}
    for prediction in predictions:
        if "score" not in prediction:
            continue
        scores.setdefault("", []).append(prediction["score"])
        if prediction.get("question_type") is not None:
            scores.setdefault(str(prediction["question_type"]), []).append(prediction["score"])
    return {
        ("vqa_score" if kind == "" else f"vqa_score_{kind}"): 100.0 * float(np.mean(values))
        for kind, values in sorted(scores.items())
    }


def evaluate_vqa(model: Any, processor: Any, eval_set: VqaEvalSet, **kwargs: Any) -> dict[str, float]:
    """`predict_vqa` then `vqa_metrics`; `kwargs` go to `predict_vqa`."""
    return vqa_metrics(predict_vqa(model, processor, eval_set, **kwargs))


@dataclass
class GroundingEvalSet:
    """Referring expressions with the box they refer to and the candidate boxes to choose from.

    Attributes:
        samples: grounding samples (`albef_hf.data.downstream`): `{"image", "text", "box": [x, y, w, h],
            "candidate_boxes": [[x, y, w, h], ...]}` in pixels of the image; optionally `"split"` (accuracy is
            also reported per split, as RefCOCO+'s val / testA / testB).
    """

    samples: Sequence[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.samples)


def predict_grounding(
    model: Any,
    processor: Any,
    eval_set: GroundingEvalSet,
    mode: str = "itm",
    layer: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Choose a candidate box for every expression of `eval_set` by Grad-CAM (split across processes).

    The heatmap (`gradcam_itm`, or `gradcam_itc` with `mode="itc"`) is upsampled to each image's own size, and
    the candidate with the largest mass / sqrt(area) is chosen (`select_box`), as the original's evaluation.

    Returns:
        One dict per sample, in order: `index`, `box` (the chosen [x, y, w, h]), `candidate` (its index),
        `iou` with the true box and `correct` (IoU >= 0.5).
    """
    if mode not in ("itm", "itc"):
        raise ValueError(f"mode must be 'itm' or 'itc', got {mode!r}")
    gradcam = gradcam_itm if mode == "itm" else gradcam_itc
    device = _model_device(model, device)
    rows, gathered = _process_share(len(eval_set.samples))
    results, index = [], rows.start
    with _eval_mode(model):
        for batch in _in_batches(eval_set.samples, rows, batch_size):
            images = [to_pil_rgb(sample["image"]) for sample in batch]
            inputs = processor(images=images, text=[sample["text"] for sample in batch])
            inputs = {key: value.to(device) for key, value in inputs.items()}
            maps = gradcam(
                model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], layer
            ).gradcam
            for sample, image, grid in zip(batch, images, maps, strict=True):
                width, height = image.size
                heatmap = upsample_heatmap(grid[None].float(), (height, width))[0]
                candidate = select_box(heatmap, sample["candidate_boxes"])
                box = [float(v) for v in sample["candidate_boxes"][candidate]]
                iou = box_iou(box, sample["box"])
                result = {
                    "index": index,
                    "box": box,
                    "candidate": candidate,
                    "iou": iou,
                    "correct": iou >= 0.5,
                }
                if sample.get("split") is not None:
                    result["split"] = sample["split"]
                results.append(result)
                index += 1
    return _gather_lists(results) if gathered else results


def grounding_metrics(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`box_accuracy` (percent of IoU >= 0.5) and `box_accuracy_<split>` per sample `split`."""
    hits: dict[str, list[bool]] = {}
    for prediction in predictions:
        hits.setdefault("", []).append(prediction["correct"])
        split = prediction.get("split")
        if split is not None:
            hits.setdefault(str(split), []).append(prediction["correct"])
    return {
        ("box_accuracy" if split == "" else f"box_accuracy_{split}"): 100.0 * float(np.mean(values))
        for split, values in sorted(hits.items())
    }


def evaluate_grounding(
    model: Any, processor: Any, eval_set: GroundingEvalSet, **kwargs: Any
) -> dict[str, float]:
    """`predict_grounding` then `grounding_metrics`; `kwargs` go to `predict_grounding`."""
    predictions = predict_grounding(model, processor, eval_set, **kwargs)
    return grounding_metrics(predictions)
