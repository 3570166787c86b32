"""ALBEF's objectives as pure functions over tensors.

- ITC: image-text contrastive loss with (optionally soft) targets, against in-batch features or
  against the momentum features of the batch followed by a feature queue;
- ITM: hard-negative sampling for image-text matching, one draw for the whole batch;
- MLM: BERT masking (80% [MASK], 10% random token, 10% unchanged) and the distilled MLM loss;
- downstream tasks: the distilled classification loss (NLVR2, SNLI-VE), the weighted answer-sequence loss of
  the VQA decoder, and the NLVR2 text-assignment (TA) sampling of image pairs.

Every random draw accepts a `torch.Generator`, so a test can replay it; the models also accept the
drawn indices themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "answer_sequence_loss",
    "contrastive_targets",
    "distilled_cross_entropy",
    "distilled_targets",
    "itc_loss",
    "mask_tokens",
    "mlm_loss",
    "sample_hard_negatives",
    "sample_text_assignment",
    "soft_cross_entropy",
    "text_assignment_labels",
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
    return distilled_cross_entropy(logits, labels, teacher_logits, alpha)


def distilled_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """`(1 - alpha) * CE(logits, labels) + alpha * soft-CE(logits, softmax(teacher_logits))`, means over rows.

    The loss of every distilled classifier in ALBEF: MLM, the NLVR2 and SNLI-VE heads. Without a teacher (or
    with `alpha=0`) it is the plain cross-entropy.
    """
    if teacher_logits is None or alpha == 0:
        return F.cross_entropy(logits, labels)
    # one log-softmax for both terms: over a vocabulary, each one kept for backward is a large tensor
    log_probs = F.log_softmax(logits, dim=-1)
    loss = F.nll_loss(log_probs, labels)
    distill = -(log_probs * teacher_logits.softmax(dim=-1)).sum(dim=-1).mean()
    return (1 - alpha) * loss + alpha * distill


def answer_sequence_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-sequence language-modelling loss of the VQA answer decoder, `(num_answers,)`.

    Token `t + 1` is predicted from position `t`; the loss of a sequence is the sum (not the mean) over its
    target tokens of the cross-entropy, positions labelled -100 ignored. With a teacher it is
    `(1 - alpha) * CE + alpha * soft-CE(softmax(teacher_logits))`, the soft term summed over the same target
    positions, as in the original.

    Args:
        logits: `(num_answers, answer_len, vocab)` decoder scores of the answer tokens.
        labels: `(num_answers, answer_len)` the answer ids with -100 where there is nothing to predict (padding);
            the first position ([CLS], the start token) is never a target.
        teacher_logits: the momentum decoder's `(num_answers, answer_len, vocab)` scores of the same answers.
        alpha: distillation weight.
    """
    scores = logits[:, :-1]
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(scores.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    loss = token_loss.sum(dim=1)
    if teacher_logits is None or alpha == 0:
        return loss
    soft_targets = teacher_logits[:, :-1].softmax(dim=-1)
    distill = -(F.log_softmax(scores, dim=-1) * soft_targets).sum(dim=-1)
    distill = (distill * (targets != -100)).sum(dim=1)
    return (1 - alpha) * loss + alpha * distill


def sample_text_assignment(
    image_feat: torch.Tensor,
    temperature: float = 0.07,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the image pairs of NLVR2 text-assignment (TA) pretraining, as the original does.

    Sample `b` (its text describes image `b`) gets, with probability 2/3, image `b` and one other image
    `j ~ softmax(sim_b / temperature)` (the diagonal zeroed), `b` first or second with probability 1/2 each;
    with probability 1/3 it gets two distinct other images drawn from the same distribution. `sim` is the cosine
    similarity of the projected image features. The draws are made sample by sample in the original's order
    (uniform, similarity draw, uniform), so a seeded generator replays the original exactly.

    Args:
        image_feat: `(batch, embed_dim)` L2-normalised image features (`project_image` of the image tokens).
        temperature: the fixed temperature of the similarity softmax (0.07 in the original).
        generator: optional `torch.Generator` for a reproducible draw (all draws are made on its device).

    Returns:
        `(first_image, second_image)`, two `(batch,)` index tensors into the batch; `text_assignment_labels`
        turns them into the 3-way labels.
    """
    batch_size = image_feat.shape[0]
    if batch_size < 3:
        raise ValueError(
            f"text-assignment sampling needs at least 3 images in a batch (two others per sample), got {batch_size}"
        )
    # Without a generator the draws use the global generators as the original does: the uniform ones on the
    # CPU, the similarity draws on the features' device. A given generator makes every draw on its device.
    draw_device = generator.device if generator is not None else torch.device("cpu")
    with torch.no_grad():
        weights = (image_feat @ image_feat.T / temperature).float().softmax(dim=1)
        weights.fill_diagonal_(0)
        if generator is not None:
            weights = weights.to(generator.device)

        def uniform() -> float:
            return torch.rand(1, generator=generator, device=draw_device).item()

        first, second = [], []
        for b in range(batch_size):
            if uniform() > 1 / 3:
                other = torch.multinomial(weights[b], 1, generator=generator).item()
                pair = (b, other) if uniform() > 0.5 else (other, b)
            else:
                pair = tuple(torch.multinomial(weights[b], 2, generator=generator).tolist())
            first.append(pair[0])
            second.append(pair[1])
    device = image_feat.device
    return torch.tensor(first, device=device), torch.tensor(second, device=device)


def text_assignment_labels(first_image: torch.Tensor, second_image: torch.Tensor) -> torch.Tensor:
    """3-way TA labels of image pairs for texts `0..batch-1`: 0 = the text describes the first image, 1 = the
    second, 2 = neither (text `b` describes image `b`)."""
    own = torch.arange(first_image.shape[0], device=first_image.device)
    labels = torch.full_like(own, 2)
    labels = labels.masked_fill(second_image == own, 1)
    return labels.masked_fill(first_image == own, 0)
