"""Tests of the downstream task models: VQA, NLVR2 (+ text assignment), SNLI-VE, and their initialisation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from safetensors import safe_open
from transformers import (
    AutoModelForVisualQuestionAnswering,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
)

from albef_hf import (
    AlbefConfig,
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    AlbefTeacherOutput,
    sample_text_assignment,
    text_assignment_labels,
)

CLS, SEP, PAD = 2, 3, 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spread_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw the weights at O(1) scale, so that outputs depend clearly on the inputs (no near-ties)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def paired_config(**config_kwargs):
    """The tiny config with its 2 fusion layers doubled, as `from_pretrained_albef` builds it for NLVR2."""
    config = tiny_config(**config_kwargs).to_dict()
    text = config["text_config"]
    text["num_hidden_layers"] = text["fusion_layer"] + 2 * (text["num_hidden_layers"] - text["fusion_layer"])
    return AlbefConfig.from_dict(config)


def config_for(model_class, **config_kwargs):
    if model_class in (AlbefForVisualReasoning, AlbefForTextAssignment):
        return paired_config(**config_kwargs)
    return tiny_config(**config_kwargs)


def make(model_class, seed: int = 0, attn: str = "sdpa", **config_kwargs):
    torch.manual_seed(seed)
    config = config_for(model_class, **config_kwargs)
    config._attn_implementation = attn
    return spread_(model_class(config), seed)


def same_weights(model, attn: str):
    config = type(model.config).from_dict(model.config.to_dict())
    config._attn_implementation = attn
    other = type(model)(config)
    other.load_state_dict(model.state_dict())
    return other


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def texts(count: int, length: int = 7, seed: int = 0, pad_from: int | None = None):
    ids = torch.randint(5, 56, (count, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    if pad_from is not None:  # the last text is shorter
        ids[-1, pad_from:], mask[-1, pad_from:] = PAD, 0
    return ids, mask


def answers(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of "[CLS] tokens [SEP]", padded."""
    length = max(len(row) for row in rows) + 2
    ids = torch.full((len(rows), length), PAD)
    for i, row in enumerate(rows):
        ids[i, : len(row) + 2] = torch.tensor([CLS, *row, SEP])
    return ids, (ids != PAD).long()


def vqa_batch() -> dict:
    question_ids, question_mask = texts(2, pad_from=4)
    answer_ids, answer_mask = answers([[10], [11, 12], [13]])
    return {
        "pixel_values": images(2),
        "input_ids": question_ids,
        "attention_mask": question_mask,
        "answer_input_ids": answer_ids,
        "answer_attention_mask": answer_mask,
        "labels": answer_ids.masked_fill(answer_mask == 0, -100),
        "answer_weights": torch.tensor([0.7, 0.3, 1.0]),
        "answers_per_question": torch.tensor([2, 1]),
    }


def nlvr_batch() -> dict:
    ids, mask = texts(4, pad_from=5)
    return {
        "pixel_values": images(8).view(4, 2, 3, 32, 32),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([0, 1, 1, 0]),
    }


def ve_batch() -> dict:
    ids, mask = texts(3, pad_from=5)
    return {
        "pixel_values": images(3),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([0, 1, 2]),
    }


CLASSIFIERS = [(AlbefForVisualReasoning, nlvr_batch), (AlbefForVisualEntailment, ve_batch)]
ALL_MODELS = [(AlbefForQuestionAnswering, vqa_batch), *CLASSIFIERS]


def loss_of(model, batch) -> torch.Tensor:
    return model(**batch).loss


# ----------------------------------------------------------------------------------------------
# Shared behaviour of the task models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_class", "make_batch"), ALL_MODELS)
def test_save_load_round_trip(tmp_path, model_class, make_batch):
    model = make(model_class).eval()
    batch = make_batch()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert loaded.config.text_config._attn_implementation == "sdpa"
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


@pytest.mark.parametrize(("model_class", "make_batch"), ALL_MODELS)
def test_sdpa_and_eager_agree(model_class, make_batch):
    sdpa = make(model_class)
    eager = same_weights(sdpa, "eager")
    assert eager.config.text_config._attn_implementation == "eager"
    batch = make_batch()
    with torch.no_grad():
        out_sdpa, out_eager = sdpa(**batch), eager(**batch)
    torch.testing.assert_close(out_sdpa.logits, out_eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_sdpa.loss, out_eager.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model_class", "make_batch"), ALL_MODELS)
def test_loss_decreases_on_a_tiny_batch(model_class, make_batch):
    torch.manual_seed(0)
    model = model_class(config_for(model_class)).train()
    batch = make_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(12):
        loss = loss_of(model, batch)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_of(model, batch).item() < 0.5 * first


@pytest.mark.parametrize(("model_class", "make_batch"), CLASSIFIERS)
def test_classifier_distillation(model_class, make_batch):
    student, teacher = make(model_class, seed=0), make(model_class, seed=1)
    batch = make_batch()
    teacher_outputs = teacher.compute_teacher_outputs(**batch)
    assert not teacher_outputs.logits.requires_grad
    plain = student(**batch)
    assert torch.equal(student(**batch, teacher_outputs=teacher_outputs, alpha=0.0).loss, plain.loss)
    distilled = student(**batch, teacher_outputs=teacher_outputs, alpha=0.4).loss
    soft = -(teacher_outputs.logits.softmax(-1) * plain.logits.log_softmax(-1)).sum(-1).mean()
    expected = 0.6 * F.cross_entropy(plain.logits, batch["labels"]) + 0.4 * soft
    torch.testing.assert_close(distilled, expected)
    assert not torch.allclose(distilled, plain.loss)


@pytest.mark.parametrize(("model_class", "make_batch"), CLASSIFIERS)
def test_classifier_labels_and_outputs(model_class, make_batch):
    model = make(model_class)
    batch = make_batch()
    output = model(**batch)
    assert output.logits.shape == (len(batch["labels"]), model.config.num_labels)
    assert model.config.num_labels == len(model_class.label_names)
    loss, logits = model(**batch, return_dict=False)[:2]
    assert torch.equal(logits, output.logits) and torch.equal(loss, output.loss)
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).loss is None


def test_visual_entailment_label_names():
    assert AlbefForVisualEntailment(tiny_config()).config.id2label == {
        0: "contradiction",
        1: "neutral",
        2: "entailment",
    }


# ----------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------


def test_vqa_loss_is_the_weighted_sum_of_answer_losses_over_questions():
    model = make(AlbefForQuestionAnswering)
    batch = vqa_batch()
    output = model(**batch)
    log_probs = output.logits.log_softmax(-1)
    per_answer = []
    for i, labels in enumerate(batch["labels"]):
        per_answer.append(
            -sum(log_probs[i, t - 1, labels[t]] for t in range(1, len(labels)) if labels[t] != -100)
        )
    per_answer = torch.stack(per_answer)
    torch.testing.assert_close(output.answer_loss, per_answer)
    torch.testing.assert_close(output.loss, (batch["answer_weights"] * per_answer).sum() / 2)


def test_vqa_answers_attend_to_their_own_question():
    model = make(AlbefForQuestionAnswering)
    batch = vqa_batch()
    full = model(**batch)
    second = {
        key: value[1:] if key in ("pixel_values", "input_ids", "attention_mask") else value[2:]
        for key, value in batch.items()
        if key != "answers_per_question"
    }
    torch.testing.assert_close(model(**second).logits, full.logits[2:], atol=1e-5, rtol=1e-5)


def test_vqa_distillation_uses_the_teacher_distribution():
    student, teacher = make(AlbefForQuestionAnswering, seed=0), make(AlbefForQuestionAnswering, seed=1)
    batch = vqa_batch()
    teacher_outputs = teacher.compute_teacher_outputs(**batch)
    assert teacher_outputs.logits.shape == batch["answer_input_ids"].shape + (
        student.config.text_config.vocab_size,
    )
    plain = student(**batch)
    assert torch.equal(student(**batch, teacher_outputs=teacher_outputs, alpha=0.0).loss, plain.loss)
    distilled = student(**batch, teacher_outputs=teacher_outputs, alpha=0.4)
    log_probs, soft = plain.logits.log_softmax(-1), teacher_outputs.logits.softmax(-1)
    expected = []
    for i, labels in enumerate(batch["labels"]):
        targets = [t for t in range(1, len(labels)) if labels[t] != -100]
        hard = -sum(log_probs[i, t - 1, labels[t]] for t in targets)
        soft_term = -sum((soft[i, t - 1] * log_probs[i, t - 1]).sum() for t in targets)
        expected.append(0.6 * hard + 0.4 * soft_term)
    torch.testing.assert_close(distilled.answer_loss, torch.stack(expected))


def brute_force_scores(model, question_states, question_mask, answer_rows):
    """The original's answer score, each answer decoded alone: log p(first token) + sum log p(token | prefix)."""
    scores = torch.zeros(question_states.shape[0], len(answer_rows))
    for q in range(question_states.shape[0]):
        for a, row in enumerate(answer_rows):
            ids = torch.tensor([[CLS, *row, SEP]])
            logits, _ = model.decode(ids, question_states[q : q + 1], question_mask[q : q + 1])
            log_probs = logits[0].log_softmax(-1)
            likelihood = sum(log_probs[t - 1, ids[0, t]] for t in range(1, ids.shape[1]))
            scores[q, a] = log_probs[0, ids[0, 1]] + likelihood
    return scores


def test_rank_answers_equals_brute_force_ranking_when_k_is_the_list_size():
    model = make(AlbefForQuestionAnswering).eval()
    rows = [[10], [11, 12], [13], [14, 15, 16], [10, 17]]
    answer_ids, answer_mask = answers(rows)
    question_ids, question_mask = texts(3, pad_from=4)
    ranking = model.rank_answers(
        answer_ids,
        answer_mask,
        input_ids=question_ids,
        pixel_values=images(3),
        attention_mask=question_mask,
        k=5,
    )
    with torch.no_grad():
        expected = brute_force_scores(model, ranking.question_states, question_mask, rows)
    order = expected.argsort(dim=1, descending=True)
    assert torch.equal(ranking.answer_ids, order)
    torch.testing.assert_close(ranking.scores, expected.gather(1, order), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ranking.probs, expected.softmax(-1).gather(1, order), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected[0], expected[1], atol=1e-2)  # the scores depend on the question


def test_rank_answers_keeps_the_k_most_probable_first_tokens():
    model = make(AlbefForQuestionAnswering).eval()
    rows = [[10], [11, 12], [13], [14, 15, 16], [10, 17]]
    answer_ids, answer_mask = answers(rows)
    question_ids, question_mask = texts(3)
    ranking = model.rank_answers(
        answer_ids,
        answer_mask,
        input_ids=question_ids,
        pixel_values=images(3),
        attention_mask=question_mask,
        k=2,
    )
    first_probs = ranking.first_token_logits.softmax(-1)[:, answer_ids[:, 1]]
    kept = first_probs.topk(2, dim=1).indices
    assert torch.equal(ranking.answer_ids.sort(dim=1).values, kept.sort(dim=1).values)
    torch.testing.assert_close(ranking.probs.sum(1), torch.ones(3))


def ranking_by_full_decoding(model, answer_ids, answer_mask, question_states, question_mask, k):
    """The ranking as first written (and as the original computes it): every kept answer decoded in full with
    its own copy of the question states, a log-softmax over the vocabulary at every position."""
    num_questions = question_states.shape[0]
    start = answer_ids[:1, :1].expand(num_questions, 1)
    first_logits = model.decode(start, question_states, question_mask)[0][:, 0]
    top_probs, top_ids = first_logits.softmax(-1)[:, answer_ids[:, 1]].topk(k, dim=1)
    candidates = answer_ids[top_ids.reshape(-1)]
    output = model(
        question_states=question_states,
        question_attention_mask=question_mask,
        answer_input_ids=candidates,
        answer_attention_mask=answer_mask[top_ids.reshape(-1)],
        labels=candidates.masked_fill(candidates == PAD, -100),
        answers_per_question=torch.full((num_questions,), k),
    )
    scores = top_probs.log() - output.answer_loss.view(num_questions, k)
    order = scores.argsort(dim=1, descending=True)
    return top_ids.gather(1, order), scores.gather(1, order)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("k", [4, 9])
def test_rank_answers_equals_full_decoding_of_every_candidate(attn, k):
    # shared prefixes ([11, 12] / [11, 13] / [11, 13, 15]), answers of 1-3 tokens, a question with padding
    model = make(AlbefForQuestionAnswering, attn=attn).eval()
    rows = [[10], [11, 12], [11, 13], [11, 13, 15], [14], [16, 17, 18], [10, 17], [19], [11]]
    answer_ids, answer_mask = answers(rows)
    question_ids, question_mask = texts(3, pad_from=4)
    with torch.no_grad():
        states = model.encode_question(images(3), question_ids, question_mask)[0]
        expected_ids, expected_scores = ranking_by_full_decoding(
            model, answer_ids, answer_mask, states, question_mask, k
        )
    for mask in (answer_mask, None):  # without a mask, padding is recognised by the pad id
        ranking = model.rank_answers(
            answer_ids, mask, question_states=states, question_attention_mask=question_mask, k=k
        )
        assert torch.equal(ranking.answer_ids, expected_ids)
        torch.testing.assert_close(ranking.scores, expected_scores, atol=1e-5, rtol=1e-6)


def test_answer_token_log_probs_reads_each_state_once_in_any_chunking():
    model = make(AlbefForQuestionAnswering).eval()
    states = torch.randn(7, model.config.decoder_config.hidden_size)
    rows, tokens = torch.tensor([0, 6, 3, 3, 5, 0]), torch.tensor([10, 3, 12, 13, 3, 20])
    with torch.no_grad():
        logits = model.answer_head(states, model.text_decoder.embeddings.word_embeddings.weight)
        expected = logits.log_softmax(-1)[rows, tokens]
        for chunk_size in (1, 2, 3, 7, 256):
            log_probs = model.answer_token_log_probs(states, rows, tokens, chunk_size=chunk_size)
            torch.testing.assert_close(log_probs, expected, atol=1e-6, rtol=1e-6)


def manual_greedy(model, question_states, question_mask, max_new_tokens):
    ids = torch.full((question_states.shape[0], 1), CLS)
    done = torch.zeros(question_states.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(
            answer_input_ids=ids, question_states=question_states, question_attention_mask=question_mask
        )
        next_ids = torch.where(done, PAD, logits.logits[:, -1].argmax(-1))
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        done |= next_ids == SEP
        if done.all():
            break
    return ids


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_agrees_with_a_hand_written_greedy_decode(use_cache):
    model = make(AlbefForQuestionAnswering, seed=3).eval()
    question_ids, question_mask = texts(4, pad_from=3)
    pixel_values = images(4)
    generated = model.generate(
        input_ids=question_ids,
        pixel_values=pixel_values,
        attention_mask=question_mask,
        max_new_tokens=6,
        use_cache=use_cache,
    )
    with torch.no_grad():
        states, mask, _ = model.encode_question(pixel_values, question_ids, question_mask)
        expected = manual_greedy(model, states, mask, 6)
    assert torch.equal(generated, expected)
    assert len({tuple(row) for row in generated.tolist()}) > 1


def test_beam_search_with_and_without_cache_agree():
    model = make(AlbefForQuestionAnswering, seed=3).eval()
    question_ids, question_mask = texts(2)
    kwargs = {"input_ids": question_ids, "pixel_values": images(2), "attention_mask": question_mask}
    with_cache = model.generate(**kwargs, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    without = model.generate(**kwargs, max_new_tokens=5, num_beams=3, num_return_sequences=2, use_cache=False)
    assert with_cache.shape[0] == 4 and torch.equal(with_cache, without)
    assert (with_cache[:, 0] == CLS).all()


@pytest.mark.parametrize("cache_class", ["dynamic", "encoder_decoder"])
def test_cached_decoding_matches_the_full_decoder(cache_class):
    model = make(AlbefForQuestionAnswering).eval()
    question_ids, question_mask = texts(2, pad_from=4)
    answer_ids, _ = answers([[10, 11, 12], [13, 14, 15]])
    with torch.no_grad():
        states, mask, _ = model.encode_question(images(2), question_ids, question_mask)
        full, _ = model.decode(answer_ids, states, mask)
        cache = (
            DynamicCache()
            if cache_class == "dynamic"
            else EncoderDecoderCache(DynamicCache(), DynamicCache())
        )
        steps = [model.decode(answer_ids[:, :2], states, mask, cache=cache)[0]]
        for t in range(2, answer_ids.shape[1]):
            steps.append(model.decode(answer_ids[:, t : t + 1], states, mask, cache=cache)[0])
    assert cache.get_seq_length() == answer_ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_the_encoder_refuses_a_cache():
    model = make(AlbefForQuestionAnswering)
    ids, mask = texts(1)
    with pytest.raises(ValueError, match="only used by a decoder"):
        model.text_encoder(input_ids=ids, attention_mask=mask, mode="text", cache=DynamicCache())


def test_vqa_folder_loads_with_the_auto_class_and_keeps_generation_settings(tmp_path):
    model = make(AlbefForQuestionAnswering)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForVisualQuestionAnswering"] == (
        "modeling_albef_downstream.AlbefForQuestionAnswering"
    )
    assert config["decoder_config"]["num_hidden_layers"] == 6 and config["decoder_config"]["is_decoder"]
    for module in ("modeling_albef_downstream", "modeling_albef", "modeling_albef_text", "losses"):
        assert (tmp_path / f"{module}.py").exists()
    loaded = AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path)
    assert isinstance(loaded, AlbefForQuestionAnswering)
    assert (loaded.generation_config.bos_token_id, loaded.generation_config.eos_token_id) == (CLS, SEP)


def test_vqa_from_pretrained_albef_copies_the_multimodal_layers_into_the_decoder():
    pretrained = make(AlbefForPreTraining)
    model, report = AlbefForQuestionAnswering.from_pretrained_albef(
        pretrained, image_size=48, output_loading_info=True
    )
    source, target = pretrained.state_dict(), model.state_dict()
    fusion = pretrained.config.fusion_layer
    for i in range(pretrained.config.text_config.num_hidden_layers - fusion):
        name = "crossattention.self.query.weight"
        source_key = f"text_encoder.encoder.layer.{fusion + i}.{name}"
        assert torch.equal(target[f"text_decoder.encoder.layer.{i}.{name}"], source[source_key])
        assert report.duplicated[f"text_decoder.encoder.layer.{i}.{name}"] == source_key
    assert torch.equal(
        target["text_decoder.embeddings.word_embeddings.weight"],
        source["text_encoder.embeddings.word_embeddings.weight"],
    )
    assert torch.equal(
        target["answer_head.transform.dense.weight"], source["mlm_head.transform.dense.weight"]
    )
    # the tiny source has 2 fusion layers for a 6-layer decoder: layers 2..5 start fresh, and the report says so
    assert {key.split(".")[3] for key in report.initialized} == {"2", "3", "4", "5"}
    assert set(report.unused) == {
        f"{module}.{param}"
        for module in ("itm_head", "text_proj", "vision_proj")
        for param in ("weight", "bias")
    } | {"temp"}
    assert report.interpolated == {"vision_model.pos_embed": "vision_model.pos_embed"}
    assert model.config.image_size == 48 and target["vision_model.pos_embed"].shape[1] == 37
    assert "text_decoder.encoder.layer.2: not in the source" in str(report)
    assert "1 interpolated, 104 newly initialised (text_decoder.encoder.layer.2, " in report.summary()


# ----------------------------------------------------------------------------------------------
# NLVR2
# ----------------------------------------------------------------------------------------------


def test_nlvr_pairs_share_cross_attention_key_and_value():
    model = make(AlbefForVisualReasoning)
    layers = model.text_encoder.encoder.layer
    assert len(layers) == 6  # 2 text layers + 2 fusion layers, each doubled
    for first in (2, 4):
        owner, partner = layers[first].crossattention.self, layers[first + 1].crossattention.self
        assert owner.key is partner.key and owner.value is partner.value
        assert owner.query is not partner.query
    loss_of(model, nlvr_batch()).backward()
    assert layers[2].crossattention.self.key.weight.grad is not None


def test_nlvr_checkpoint_stores_shared_weights_once_and_reloads_them_tied(tmp_path):
    model = make(AlbefForVisualReasoning)
    assert "text_encoder.encoder.layer.3.crossattention.self.key.weight" in model.state_dict()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    assert "text_encoder.encoder.layer.2.crossattention.self.key.weight" in keys
    assert "text_encoder.encoder.layer.3.crossattention.self.key.weight" not in keys
    assert "text_encoder.encoder.layer.3.crossattention.self.query.weight" in keys
    loaded = AlbefForVisualReasoning.from_pretrained(tmp_path)
    layers = loaded.text_encoder.encoder.layer
    assert layers[3].crossattention.self.value is layers[2].crossattention.self.value
    assert torch.equal(
        layers[3].crossattention.self.key.weight,
        model.state_dict()["text_encoder.encoder.layer.3.crossattention.self.key.weight"],
    )


def test_nlvr_layers_of_a_pair_compute_the_same_attention_for_identical_images():
    pretrained = make(AlbefForPreTraining)
    model, report = AlbefForVisualReasoning.from_pretrained_albef(pretrained, output_loading_info=True)
    model.eval()
    assert report.duplicated["text_encoder.encoder.layer.5.output.dense.weight"] == (
        "text_encoder.encoder.layer.3.output.dense.weight"
    )
    ids, mask = texts(2, pad_from=5)
    image = images(2)
    with torch.no_grad():
        image_embeds = model.encode_image(image).last_hidden_state
        states = model.fuse_pair(ids, mask, image_embeds, image_embeds)
        hidden = model.text_encoder(input_ids=ids, attention_mask=mask, mode="text").last_hidden_state
        text_mask = mask[:, None, None, :].bool()
        for first in (2, 4):
            outputs = [
                model.text_encoder.encoder.layer[index](
                    hidden, text_mask, image_embeds, None, output_attentions=True
                )
                for index in (first, first + 1)
            ]
            torch.testing.assert_close(outputs[0][2], outputs[1][2])
            torch.testing.assert_close(outputs[0][0], outputs[1][0])
            hidden = outputs[0][0]
            hidden = model.text_encoder.encoder.layer[first + 1](hidden, text_mask, image_embeds, None)[0]
        torch.testing.assert_close(hidden, states.last_hidden_state)


def test_nlvr_second_layer_of_each_pair_reads_the_second_image():
    model = make(AlbefForVisualReasoning, attn="eager").eval()
    ids, mask = texts(2)
    pixel_values = images(4).view(2, 2, 3, 32, 32)
    with torch.no_grad():
        embeds = model.encode_image_pairs(pixel_values)
        fused = model.fuse_pair(ids, mask, embeds[:, 0], embeds[:, 1], output_attentions=True)
        full = model.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=[embeds[:, 0], embeds[:, 1]],
            mode="multimodal",
            output_hidden_states=True,
        )
        for index in range(2, 6):
            layer = model.text_encoder.encoder.layer[index]
            image = embeds[:, (index - 2) % 2]
            _, _, cross = layer(
                full.hidden_states[index], mask[:, None, None, :].bool(), image, output_attentions=True
            )
            torch.testing.assert_close(cross, fused.cross_attentions[index - 2])
        separate = torch.stack(
            [model.encode_image(pixel_values[:, i]).last_hidden_state for i in range(2)], dim=1
        )
    torch.testing.assert_close(embeds, separate, atol=1e-5, rtol=1e-5)


def test_nlvr_rejects_a_config_with_an_odd_number_of_fusion_layers():
    with pytest.raises(ValueError, match="even number of fusion layers"):
        AlbefForVisualReasoning(tiny_config(fusion_layer=1))


def test_nlvr_from_the_text_assignment_model_copies_every_encoder_weight():
    ta_model = AlbefForTextAssignment.from_pretrained_albef(make(AlbefForPreTraining))
    model, report = AlbefForVisualReasoning.from_pretrained_albef(ta_model, output_loading_info=True)
    assert model.config.text_config.num_hidden_layers == 6
    assert not report.duplicated
    assert all(key.startswith("cls_head.") for key in report.initialized)
    assert set(report.unused) == {"ta_head.weight", "ta_head.bias", "vision_proj.weight", "vision_proj.bias"}
    source = ta_model.state_dict()
    assert all(torch.equal(value, source[key]) for key, value in model.state_dict().items() if key in source)


def test_from_pretrained_albef_reads_a_saved_folder(tmp_path):
    pretrained = make(AlbefForPreTraining)
    pretrained.save_pretrained(tmp_path)
    model, report = AlbefForVisualEntailment.from_pretrained_albef(tmp_path, output_loading_info=True)
    assert report.source.startswith("AlbefForPreTraining")
    assert torch.equal(
        model.state_dict()["text_encoder.encoder.layer.3.crossattention.self.key.weight"],
        pretrained.state_dict()["text_encoder.encoder.layer.3.crossattention.self.key.weight"],
    )
    assert set(report.initialized) == {f"cls_head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}


# ----------------------------------------------------------------------------------------------
# NLVR2 text assignment
# ----------------------------------------------------------------------------------------------


def original_ta_draw(image_feat: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """The original's TA draw (model_pretrain_nlvr.py), restated with the global random generators."""
    weights = F.softmax(image_feat @ image_feat.t() / 0.07, dim=1)
    weights.fill_diagonal_(0)
    first, second, labels = [], [], []
    for b in range(image_feat.shape[0]):
        if torch.rand(1) > 1 / 3:
            idx = torch.multinomial(weights[b], 1).item()
            if torch.rand(1) > 0.5:
                first.append(b), second.append(idx), labels.append(0)
            else:
                first.append(idx), second.append(b), labels.append(1)
        else:
            idx = torch.multinomial(weights[b], 2)
            first.append(idx[0].item()), second.append(idx[1].item()), labels.append(2)
    return first, second, labels


def test_text_assignment_draw_replays_the_original_rule():
    image_feat = F.normalize(torch.randn(16, 8), dim=-1)
    torch.manual_seed(7)
    expected = original_ta_draw(image_feat)
    torch.manual_seed(7)
    first, second = sample_text_assignment(image_feat)
    assert (first.tolist(), second.tolist()) == expected[:2]
    assert text_assignment_labels(first, second).tolist() == expected[2]


def test_text_assignment_pairs_follow_the_rule_and_prefer_similar_images():
    # images 2k and 2k+1 are near-duplicates: the similar image drawn for one is almost always the other
    base = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    image_feat = F.normalize(base.repeat_interleave(2, dim=0) + 0.01 * torch.randn(12, 8), dim=-1)
    generator = torch.Generator().manual_seed(0)
    counts, partner_hits, draws = torch.zeros(3), 0, 0
    for _ in range(60):
        first, second = sample_text_assignment(image_feat, generator=generator)
        labels = text_assignment_labels(first, second)
        own = torch.arange(12)
        counts += torch.bincount(labels, minlength=3)
        assert ((labels == 0) == (first == own)).all() and ((labels == 1) == (second == own)).all()
        assert (first != second).all()
        neither = labels == 2
        assert ((first[neither] != own[neither]) & (second[neither] != own[neither])).all()
        other = torch.where(labels == 0, second, first)[~neither]
        partner_hits += int((other == (own[~neither] ^ 1)).sum())
        draws += int((~neither).sum())
    frequencies = counts / counts.sum()
    torch.testing.assert_close(frequencies, torch.tensor([1 / 3, 1 / 3, 1 / 3]), atol=0.05, rtol=0)
    assert partner_hits / draws > 0.95


def test_text_assignment_with_predrawn_pairs_replays_a_sampled_step():
    model = make(AlbefForTextAssignment)
    ids, mask = texts(4)
    batch = {"pixel_values": images(4), "input_ids": ids, "attention_mask": mask}
    sampled = model(**batch, generator=torch.Generator().manual_seed(3))
    replay = model(**batch, first_image=sampled.first_image, second_image=sampled.second_image)
    assert torch.equal(replay.labels, sampled.labels)
    torch.testing.assert_close(replay.loss, sampled.loss)
    torch.testing.assert_close(replay.loss, F.cross_entropy(replay.logits, replay.labels))
    assert sampled.logits.shape == (4, 3)


def test_text_assignment_needs_three_images():
    model = make(AlbefForTextAssignment)
    ids, mask = texts(2)
    with pytest.raises(ValueError, match="at least 3 images"):
        model(pixel_values=images(2), input_ids=ids, attention_mask=mask)


def test_text_assignment_loss_decreases_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = AlbefForTextAssignment(paired_config()).train()
    ids, mask = texts(4)
    batch = {"pixel_values": images(4), "input_ids": ids, "attention_mask": mask}
    pairs = {"first_image": torch.tensor([0, 2, 0, 3]), "second_image": torch.tensor([1, 1, 1, 0])}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(**batch, **pairs).loss.item()
    for _ in range(12):
        loss = model(**batch, **pairs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model(**batch, **pairs).loss.item() < 0.3 * first
    model.save_pretrained(tmp_path)
    loaded = AlbefForTextAssignment.from_pretrained(tmp_path)
    assert torch.equal(loaded(**batch, **pairs).logits, model(**batch, **pairs).logits)


def test_teacher_outputs_type_is_shared_with_pretraining():
    model = make(AlbefForVisualEntailment)
    assert isinstance(model.compute_teacher_outputs(**ve_batch()), AlbefTeacherOutput)


@pytest.mark.parametrize(("model_class", "make_batch"), ALL_MODELS)
def test_gradient_checkpointing_gives_the_same_gradients(model_class, make_batch):
    model = make(model_class).train()
    batch = make_batch()
    loss_of(model, batch).backward()
    expected = {
        name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None
    }
    model.zero_grad()
    model.activation_checkpointing_enable()
    loss_of(model, batch).backward()
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5)


def test_generate_defaults_to_the_model_special_tokens():
    model = make(AlbefForQuestionAnswering, seed=3).eval()
    question_ids, question_mask = texts(2)
    kwargs = {"input_ids": question_ids, "pixel_values": images(2), "attention_mask": question_mask}
    expected = model.generate(**kwargs, max_new_tokens=4)
    generated = model.generate(**kwargs, generation_config=GenerationConfig(max_new_tokens=4))
    assert torch.equal(generated, expected) and (generated[:, 0] == CLS).all()
    with pytest.raises(ValueError, match="answer_input_ids"):
        model(**kwargs, labels=torch.zeros(2, 3, dtype=torch.long))
