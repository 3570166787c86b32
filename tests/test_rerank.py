"""ITM re-ranking with less work (`itm_pair_logits`, `rank`, `itm_rerank`) against the straightforward computation.

The straightforward computation is the original evaluation's: every pair on its own through the fusion layers at
full padding, each with its own copy of the image tokens (`itm_logits`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from albef_hf import AlbefForImageTextRetrieval
from albef_hf.evaluation import encode_texts_by_length

NUM_IMAGES, NUM_TEXTS, SEQ_LEN = 5, 9, 12
LENGTHS = [12, 3, 7, 1, 9, 5, 12, 2, 6]  # uneven, one text of [CLS] alone, two at full length


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def setup(request, one_torch_thread):
    torch.manual_seed(0)
    model = AlbefForImageTextRetrieval._from_config(tiny_config(), attn_implementation=request.param).eval()
    input_ids = torch.randint(5, model.config.text_config.vocab_size, (NUM_TEXTS, SEQ_LEN))
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    input_ids[:, 0] = model.config.text_config.cls_token_id
    input_ids[attention_mask == 0] = 0
    with torch.no_grad():
        images = model.encode_image(torch.randn(NUM_IMAGES, 3, 32, 32)).last_hidden_state
        texts = model.encode_text(input_ids, attention_mask).last_hidden_state
    return model, images, texts, input_ids, attention_mask


def straightforward(model, images, texts, mask, image_index, text_index) -> torch.Tensor:
    """ITM logits `(num_pairs, 2)`, one pair at a time at full padding."""
    with torch.no_grad():
        return torch.cat(
            [
                model.itm_logits(texts[t : t + 1], mask[t : t + 1], images[i : i + 1])
                for i, t in zip(image_index.tolist(), text_index.tolist(), strict=True)
            ]
        )


def original_rank(model, images, texts, mask, k) -> tuple[torch.Tensor, torch.Tensor]:
    """The original evaluation: each query's top k by ITC, its pairs scored one query at a time."""
    with torch.no_grad():
        sims = model.project_image(images) @ model.project_text(texts).T
    scores_i2t = torch.full((NUM_IMAGES, NUM_TEXTS), -100.0)
    scores_t2i = torch.full((NUM_TEXTS, NUM_IMAGES), -100.0)
    for i in range(NUM_IMAGES):
        top = sims[i].topk(min(k, NUM_TEXTS)).indices
        scores_i2t[i, top] = straightforward(model, images, texts, mask, torch.full_like(top, i), top)[:, 1]
    for t in range(NUM_TEXTS):
        top = sims[:, t].topk(min(k, NUM_IMAGES)).indices
        scores_t2i[t, top] = straightforward(model, images, texts, mask, top, torch.full_like(top, t))[:, 1]
    return scores_i2t, scores_t2i


@pytest.mark.parametrize("batch_size", [1, 4, 128])
def test_pair_logits_equal_one_pair_at_a_time(setup, batch_size):
    model, images, texts, _, mask = setup
    generator = torch.Generator().manual_seed(1)
    image_index = torch.randint(0, NUM_IMAGES, (40,), generator=generator)
    text_index = torch.randint(0, NUM_TEXTS, (40,), generator=generator)
    image_index[30:], text_index[30:] = image_index[:10], text_index[:10]  # duplicates
    logits = model.itm_pair_logits(images, texts, mask, image_index, text_index, batch_size)
    expected = straightforward(model, images, texts, mask, image_index, text_index)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(logits[30:], logits[:10])


@pytest.mark.parametrize("k", [2, 4, 50])  # 50: more than either gallery
def test_rank_equals_the_original_evaluation_in_both_directions(setup, k):
    model, images, texts, _, mask = setup
    ranking = model.rank(images, texts, mask, k=k, batch_size=6)
    expected_i2t, expected_t2i = original_rank(model, images, texts, mask, k)
    torch.testing.assert_close(ranking.scores_i2t, expected_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(ranking.scores_t2i, expected_t2i, atol=1e-5, rtol=0)
    assert ((ranking.scores_i2t != -100).sum(dim=1) == min(k, NUM_TEXTS)).all()
    assert ((ranking.scores_t2i != -100).sum(dim=1) == min(k, NUM_IMAGES)).all()


def test_itm_rerank_equals_one_pair_at_a_time(setup):
    model, images, texts, _, mask = setup
    with torch.no_grad():
        sims = model.project_image(images) @ model.project_text(texts).T
    for query_sims, image_queries in ((sims, True), (sims.T, False)):
        itc, candidates, logits = model.itm_rerank(query_sims, images, texts, mask, 3, 5, image_queries)
        assert candidates.shape == (query_sims.shape[0], 3) and logits.shape == (query_sims.shape[0], 3, 2)
        torch.testing.assert_close(itc, query_sims.gather(1, candidates))
        queries = torch.arange(query_sims.shape[0]).repeat_interleave(3)
        pairs = (queries, candidates.reshape(-1)) if image_queries else (candidates.reshape(-1), queries)
        expected = straightforward(model, images, texts, mask, *pairs)
        torch.testing.assert_close(logits.reshape(-1, 2), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [2, 128])
def test_each_pair_scored_once_and_each_image_projected_once_per_fusion_layer(setup, batch_size):
    """With k covering both galleries, every pair is on both shortlists: the ITM head sees each pair once, and
    the cross-attention key projection of each fusion layer sees each image's tokens once."""
    model, images, texts, _, mask = setup
    seen = {"itm": 0, "key": []}
    hooks = [model.itm_head.register_forward_hook(lambda m, i, o: seen.update(itm=seen["itm"] + o.shape[0]))]
    fusion = model.text_encoder.encoder.layer[model.config.text_config.fusion_layer :]
    for layer in fusion:
        hooks.append(
            layer.crossattention.self.key.register_forward_hook(
                lambda m, i, o: seen["key"].append(o.shape[:2])
            )
        )
    try:
        model.rank(images, texts, mask, k=50, batch_size=batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["itm"] == NUM_IMAGES * NUM_TEXTS
    assert sum(rows for rows, _ in seen["key"]) == NUM_IMAGES * len(fusion)
    assert all(length == images.shape[1] for _, length in seen["key"])


def test_fusion_batches_are_cut_to_their_longest_text(setup):
    model, images, texts, _, mask = setup
    lengths = []
    hook = model.text_encoder.encoder.layer[-1].register_forward_pre_hook(
        lambda m, args: lengths.append(args[0].shape[:2])
    )
    try:
        model.rank(images, texts, mask, k=50, batch_size=NUM_IMAGES * NUM_TEXTS)
    finally:
        hook.remove()
    # one chunk of images and one batch: it reaches the longest text; smaller batches go in order of length
    assert lengths == [(NUM_IMAGES * NUM_TEXTS, max(LENGTHS))]
    lengths.clear()
    hook = model.text_encoder.encoder.layer[-1].register_forward_pre_hook(
        lambda m, args: lengths.append(args[0].shape[:2])
    )
    try:
        model.itm_pair_logits(
            images, texts, mask, torch.zeros(NUM_TEXTS, dtype=torch.long), torch.arange(9), 3
        )
    finally:
        hook.remove()
    assert [length for _, length in lengths] == [3, 7, 12]  # sorted lengths 1 2 3 | 5 6 7 | 9 12 12


def test_first_token_only_and_projected_keys_values_equal_the_full_fusion(setup):
    model, images, texts, _, mask = setup
    index = torch.tensor([0, 3, 3, 1, 4, 0, 2, 2, 1])
    with torch.no_grad():
        full = model.fuse(texts, mask, images[index]).last_hidden_state
        key_values = model.text_encoder.project_cross_key_values(images)
        shared = model.fuse(texts, mask, None, image_index=index, image_key_values=key_values)
        first = model.fuse(
            texts, mask, None, image_index=index, image_key_values=key_values, first_token_only=True
        )
    torch.testing.assert_close(shared.last_hidden_state, full, atol=1e-5, rtol=0)
    assert first.last_hidden_state.shape == (NUM_TEXTS, 1, full.shape[-1])
    torch.testing.assert_close(first.last_hidden_state[:, 0], full[:, 0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        model.fuse(texts, mask, images, image_key_values=key_values)
    with pytest.raises(ValueError, match="fusion layers"):
        model.fuse(texts, mask, None, image_index=index, image_key_values=key_values[:1])


@pytest.mark.parametrize("fusion_layer", [3, 1])  # one fusion layer, three
def test_text_self_attention_once_per_text_equals_the_full_fusion(fusion_layer):
    model = AlbefForImageTextRetrieval(tiny_config(fusion_layer=fusion_layer)).eval()
    texts, images = torch.randn(4, 6, 32), torch.randn(3, 17, 32)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2, [1] + [0] * 5])
    index = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        full = model.fuse(texts, mask, images[index]).last_hidden_state
        attended = model.text_encoder.fusion_self_attention(texts, mask)
        for first_token_only in (False, True):
            fused = model.fuse(
                attended,
                mask,
                images,
                image_index=index,
                first_token_only=first_token_only,
                text_self_attended=True,
            ).last_hidden_state
            expected = full[:, :1] if first_token_only else full
            torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="fusion"):
        model.text_encoder(input_ids=torch.ones(1, 3, dtype=torch.long), mode="text", text_self_attended=True)


def test_texts_encoded_by_length_equal_the_padded_encoding(setup):
    model, _, texts, input_ids, mask = setup
    embeds, cut_mask = encode_texts_by_length(model, input_ids, mask, batch_size=4)
    assert embeds.shape == (NUM_TEXTS, max(LENGTHS), texts.shape[-1])
    assert torch.equal(cut_mask, mask[:, : max(LENGTHS)])
    real = cut_mask.bool()
    torch.testing.assert_close(embeds[real], texts[:, : max(LENGTHS)][real], atol=1e-5, rtol=0)


def test_rank_in_training_mode_equals_eval_mode(setup):
    """Training mode packs the real tokens of text batches; re-ranking must give the same scores there."""
    model, images, texts, _, mask = setup
    expected = model.rank(images, texts, mask, k=4, batch_size=6)
    model.train()  # the tiny config has no dropout
    try:
        ranking = model.rank(images, texts, mask, k=4, batch_size=6)
    finally:
        model.eval()
    torch.testing.assert_close(ranking.scores_i2t, expected.scores_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(ranking.scores_t2i, expected.scores_t2i, atol=1e-5, rtol=0)


def test_no_rows_to_rank(setup):
    model, images, texts, _, mask = setup
    ranking = model.rank(images, texts, mask, k=3, image_rows=slice(0, 0), text_rows=slice(4, 2))
    assert (ranking.scores_i2t == -100).all() and (ranking.scores_t2i == -100).all()


def test_pair_indices_are_checked(setup):
    model, images, texts, _, mask = setup
    with pytest.raises(ValueError, match="one length"):
        model.itm_pair_logits(images, texts, mask, torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="batch_size"):
        model.itm_pair_logits(images, texts, mask, torch.tensor([0]), torch.tensor([0]), batch_size=0)
