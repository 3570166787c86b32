"""ALBEF's objectives as pure functions over tensors.

- ITC: image-text contrastive loss with (optionally soft) targets, against in-batch features or
  against the momentum features of the batch followed by a feature queue;
- ITM: hard-negative sampling for image-text matching, one draw for the whole batch;
- MLM: BERT masking (80% [MASK], 10% random token, 10% unchanged) and the distilled MLM loss.

Every random draw accepts a `torch.Generator`, so a test can replay it; the models also accept the
drawn indices themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "contrastive_targets",
    "distilled_targets",
    "itc_loss",
    "mask_tokens",
    "mlm_loss",
    "sample_hard_negatives",
    "soft_cross_entropy",
]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of `-sum(targets * log_softmax(logits))`; `targets` rows sum to 1."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1).mean()


def contrastive_targets(
    batch_size: int,
    num_candidates: int,
    idx: torch.Tensor | None = None,
    idx_candidates: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Ground-truth ITC targets `(batch, num_candidates)` whose rows sum to 1.

    Without ids, sample `i` matches candidate `i` only (the batch comes first among the candidates).
    With ids (retrieval fine-tuning), every candidate with the same id is a positive and the mass is
    shared among them: `pos / pos.sum(1)`.
    """
    if idx is None:
        return torch.eye(batch_size, num_candidates, device=device)
    if idx_candidates is None:
        raise ValueError("contrastive_targets: `idx_candidates` is needed together with `idx`")
    positives = (idx.view(-1, 1) == idx_candidates.view(1, -1)).float()
    return positives / positives.sum(dim=1, keepdim=True)


def distilled_targets(
    targets: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """Momentum distillation: `alpha * softmax(teacher_logits) + (1 - alpha) * targets`."""
    if teacher_logits is None or alpha == 0:
        return targets
    return alpha * teacher_logits.softmax(dim=-1) + (1 - alpha) * targets


def itc_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    targets_i2t: torch.Tensor,
    targets_t2i: torch.Tensor,
) -> torch.Tensor:
    """Symmetric contrastive loss: the mean of the image->text and text->image soft cross-entropies."""
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    idx: torch.Tensor | None = None,
    hard: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one negative image per text and one negative text per image, for the whole batch at once.

    Args:
        sim_i2t, sim_t2i: `(batch, >= batch)` similarities; only the first `batch` columns (this batch)
            are used, as in the original.
        idx: optional `(batch,)` ids; pairs with the same id are never drawn (retrieval fine-tuning).
            Without ids, only the diagonal (the positive pair) is excluded.
        hard: draw with probability `softmax(similarity)` (hard negatives); `False` draws uniformly among
            the allowed pairs (the "random negatives" ablation).
        generator: optional `torch.Generator` for a reproducible draw.

    Returns:
        `(neg_image_per_text, neg_text_per_image)`, two `(batch,)` index tensors into the batch.
    """
    batch_size = sim_i2t.shape[0]
    with torch.no_grad():
        if idx is None:
            same = torch.eye(batch_size, dtype=torch.bool, device=sim_i2t.device)
        else:
            idx = idx.view(-1, 1)
            same = idx == idx.T
        if bool(same.all(dim=1).any()):
            raise ValueError(
                "hard-negative sampling needs, for every sample, another sample in the batch with a different "
                "image (batch size 1, or a batch whose samples all share one image id, has no negative)"
            )
        # Excluded pairs are removed before the softmax (not zeroed after it, as the original does): the same
        # distribution, but it cannot underflow to all zeros when the positive dominates.
        if hard:
            logits_i2t = sim_i2t[:, :batch_size].float().masked_fill(same, float("-inf"))
            logits_t2i = sim_t2i[:, :batch_size].float().masked_fill(same, float("-inf"))
        else:
            logits_i2t = logits_t2i = torch.zeros(same.shape, device=same.device).masked_fill(
                same, float("-inf")
            )
        weights_i2t, weights_t2i = logits_i2t.softmax(dim=1), logits_t2i.softmax(dim=1)
        neg_image_per_text = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
        neg_text_per_image = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return neg_image_per_text, neg_text_per_image


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    special_token_ids: Iterable[int],
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking for MLM, drawn for the whole batch at once.

    Each token is selected with probability `mlm_probability`, except the `special_token_ids` (the
    original excludes [PAD] and [CLS]; pass [SEP] too when the text carries one). Of the selected tokens,
    80% become [MASK], 10% a uniformly random token, 10% stay unchanged.

    Returns:
        `(masked_input_ids, labels)`: labels hold the original id at selected positions and -100 elsewhere.
    """
    device = input_ids.device
    shape = input_ids.shape

    def draw(probability: float) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device) < probability

    selected = draw(mlm_probability)
    for token_id in special_token_ids:
        selected &= input_ids != token_id
    labels = input_ids.masked_fill(~selected, -100)
    replaced = draw(0.8) & selected
    randomised = draw(0.5) & selected & ~replaced
    random_tokens = torch.randint(vocab_size, shape, generator=generator, device=device)
    masked = input_ids.masked_fill(replaced, mask_token_id)
    masked = torch.where(randomised, random_tokens, masked)
    return masked, labels


def mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Masked-LM loss, distilled from a teacher: `(1 - alpha) * CE + alpha * soft-CE(teacher)`.

    `logits` are `(num_masked, vocab)` scores at the masked positions and `labels` their `(num_masked,)`
    original ids; `teacher_logits` are the momentum model's scores at the same positions.
    """
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is None or alpha == 0:
        return loss
    distill = soft_cross_entropy(logits, teacher_logits.softmax(dim=-1))
    return (1 - alpha) * loss + alpha * distill
