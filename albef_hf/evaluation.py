"""Image-text retrieval evaluation as the original ALBEF does it.

1. Encode every image and every text once (unimodal encoders).
2. Rank all pairs by ITC similarity; re-rank the top `k` candidates of each query with the ITM "match"
   logit (`rank` of the matching models); every other candidate scores -100.
3. Recall@1/5/10 in both directions with multi-caption ground truth (`itm_eval`): an image query is
   correct at K when any of its captions is among the top K texts; a text query when its image is among
   the top K images.

Step 2 is split across processes by query rows (each process re-ranks a contiguous block of image rows
and of text rows, as the original), and the blocks are summed back together with an all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "RetrievalEvalSet",
    "compute_retrieval_scores",
    "evaluate_retrieval",
    "itm_eval",
    "retrieval_eval_set_from_samples",
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
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
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
        input_ids, attention_mask = texts["input_ids"].to(device), texts["attention_mask"].to(device)
        text_embeds = torch.cat(
            [
                model.encode_text(
                    input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
                ).last_hidden_state
                for start in range(0, input_ids.shape[0], batch_size)
            ]
        )
        image_rows = _process_rows(image_embeds.shape[0], rank, world_size)
        text_rows = _process_rows(text_embeds.shape[0], rank, world_size)
        ranking = model.rank(image_embeds, text_embeds, attention_mask, k, batch_size, image_rows, text_rows)
    finally:
        model.train(was_training)
    scores = []
    for matrix, rows in ((ranking.scores_i2t, image_rows), (ranking.scores_t2i, text_rows)):
        own = torch.zeros_like(matrix, dtype=torch.float32)
        own[rows] = matrix[rows].float()
        scores.append(reduce(own).cpu())
    return scores[0], scores[1]


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
