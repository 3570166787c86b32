"""Training skips the padding of text batches (TokenPacking): same states at real tokens, same losses, same
gradients as a padded pass, with fewer FLOPs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.utils.flop_counter import FlopCounterMode

from albef_hf import AlbefForPreTraining
from albef_hf.modeling_albef_text import TokenPacking


def _batch(generator: torch.Generator, batch: int = 6, length: int = 12) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([length, 3, 7, length - 2, 5, 9][:batch])
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 40, (batch, length), generator=generator) * mask
    ids[:, 0] = 2
    masked = ids.clone()
    labels = torch.full_like(ids, -100)
    masked[:, 1], labels[:, 1] = 4, ids[:, 1]
    return {
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator),
        "input_ids": ids,
        "attention_mask": mask,
        "mlm_input_ids": masked,
        "mlm_labels": labels,
        "hard_negatives": (torch.tensor([1, 2, 3, 4, 5, 0]), torch.tensor([5, 0, 1, 2, 3, 4])),
    }


def _run(model: AlbefForPreTraining, batch: dict):
    model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        out = model(**batch)
        out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads, counter.get_total_flops()


def _assert_same_step(out, grads, reference, reference_grads) -> None:
    """The same losses, logits and parameter gradients as the reference step of `_run`."""
    for name in ("loss", "loss_itc", "loss_itm", "loss_mlm", "itm_logits", "mlm_logits"):
        torch.testing.assert_close(out[name], reference[name], atol=1e-6, rtol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("row_multiple", [1, 16])
def test_packed_training_equals_padded(monkeypatch, row_multiple):
    torch.manual_seed(0)
    model = AlbefForPreTraining(tiny_config()).train()
    batch = _batch(torch.Generator().manual_seed(1))
    monkeypatch.setattr(TokenPacking, "row_multiple", row_multiple)
    packed, packed_grads, packed_flops = _run(model, batch)
    with monkeypatch.context() as patch:  # the padded computation, as when there is nothing to skip
        patch.setattr(TokenPacking, "of", classmethod(lambda cls, mask: None))
        padded, padded_grads, padded_flops = _run(model, batch)
    _assert_same_step(packed, packed_grads, padded, padded_grads)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(packed.text_embeds[real], padded.text_embeds[real], atol=1e-6, rtol=1e-5)
    computed = (packed.text_embeds != 0).any(-1)
    assert bool(computed[real].all())
    # padding is not computed, but for the few filler rows that round the packed rows up to a multiple
    assert int(real.sum()) <= int(computed.sum()) < int(real.sum()) + row_multiple
    assert packed_flops < 0.9 * padded_flops


def test_eval_mode_keeps_the_padded_pass():
    model = AlbefForPreTraining(tiny_config()).eval()
    batch = _batch(torch.Generator().manual_seed(2))
    with torch.no_grad():
        states = model.encode_text(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    assert bool((states[~batch["attention_mask"].bool()] != 0).any())


def test_packing_round_trip(monkeypatch):
    monkeypatch.setattr(TokenPacking, "row_multiple", 1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert TokenPacking.of(torch.ones(2, 3)) is None and TokenPacking.of(None) is None
    packing = TokenPacking.of(mask)
    states = torch.arange(18.0).view(2, 3, 3)
    packed = packing.pack(states)
    assert packed.shape == (5, 3)
    restored = packing.unpack(packed)
    torch.testing.assert_close(restored[mask.bool()], states[mask.bool()])
    assert bool((restored[0, 2] == 0).all())


def test_packed_rows_are_rounded_up_with_padding_positions():
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 30, (40,), generator=generator)
    mask = (torch.arange(30)[None] < lengths[:, None]).long()
    real = int(mask.sum())
    packing = TokenPacking.of(mask)
    rows = packing.index.numel()
    assert rows % TokenPacking.row_multiple == 0 and real <= rows < real + TokenPacking.row_multiple
    flat = mask.flatten().bool()
    assert bool(flat[packing.index].sum() == real)  # every real token is packed, the rest are padding
    assert bool((packing.index[1:] > packing.index[:-1]).all())  # in order, no repeats
    # a batch with fewer positions than the multiple packs them all
    short = TokenPacking.of(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert short.index.tolist() == [0, 1, 2, 3, 4, 5]


def _fuse_inputs(generator: torch.Generator, padded: bool):
    batch, length = 6, 12
    texts = torch.randn(batch, length, 32, generator=generator, requires_grad=True)
    lengths = torch.tensor([12, 3, 7, 10, 5, 9]) if padded else torch.full((batch,), length)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    images = torch.randn(3, 17, 32, generator=generator)
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    needed = torch.zeros(batch, length, dtype=torch.bool)
    needed[:3, 0] = True  # [CLS] of three rows, as ITM reads them
    needed[3, [2, 5]] = needed[4, 1] = needed[5, [1, 3, 8]] = True  # masked tokens, as MLM reads them
    return texts, mask, images, index, needed


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_needed_tokens_equal_the_full_fusion_where_read(monkeypatch, padded, training, attention):
    """The last fusion layer computes only the needed states: equal to the full pass there (values and the
    gradients they send back), zero elsewhere, with fewer FLOPs."""
    monkeypatch.setattr(TokenPacking, "row_multiple", 1)
    torch.manual_seed(0)
    model = AlbefForPreTraining._from_config(tiny_config(), attn_implementation=attention).train(training)
    texts, mask, images, index, needed = _fuse_inputs(torch.Generator().manual_seed(4), padded)
    results = []
    for tokens in (needed, None):
        texts.grad = None
        with FlopCounterMode(display=False) as counter:
            states = model.fuse(
                texts, mask, images, image_index=index, needed_tokens=tokens
            ).last_hidden_state
            (states[needed] * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((states, texts.grad.clone(), counter.get_total_flops()))
    (states, grad, flops), (full, full_grad, full_flops) = results
    torch.testing.assert_close(states[needed], full[needed], atol=1e-6, rtol=1e-5)
    assert bool((states[~needed] == 0).all())
    torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=1e-5)
    assert flops < 0.85 * full_flops


def test_pretraining_on_unpadded_texts_equals_the_full_fusion(monkeypatch):
    """Without padding nothing is packed, and the ITM [CLS] / MLM masked-token selection alone changes the pass."""
    torch.manual_seed(0)
    model = AlbefForPreTraining(tiny_config()).train()
    batch = _batch(torch.Generator().manual_seed(5))
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    selected, selected_grads, selected_flops = _run(model, batch)
    fuse = AlbefForPreTraining.fuse
    monkeypatch.setattr(
        AlbefForPreTraining, "fuse", lambda self, *a, needed_tokens=None, **k: fuse(self, *a, **k)
    )
    full, full_grads, full_flops = _run(model, batch)
    _assert_same_step(selected, selected_grads, full, full_grads)
    assert selected_flops < 0.9 * full_flops


def test_needed_tokens_refuse_what_they_cannot_give():
    model = AlbefForPreTraining(tiny_config()).eval()
    texts, mask, images, index, needed = _fuse_inputs(torch.Generator().manual_seed(6), True)
    with pytest.raises(ValueError, match="needed_tokens has shape"):
        model.fuse(texts, mask, images, image_index=index, needed_tokens=needed[:, :5])
    for option in ("first_token_only", "output_attentions"):
        with pytest.raises(ValueError, match="does not combine"):
            model.fuse(texts, mask, images, image_index=index, needed_tokens=needed, **{option: True})
