"""The CPU dropout of the text and vision layers behaves as `F.dropout`: rate, scaling, gradient, seeding."""

import pytest
import torch

from albef_hf.modeling_albef_text import AlbefDropout, apply_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_rate_and_scaling(p, dtype):
    torch.manual_seed(0)
    hidden = torch.rand(3, 333, 101, dtype=dtype) + 1  # an odd element count: the last draw is shared
    out = apply_dropout(hidden, p)
    dropped = out == 0
    assert out.dtype == dtype and out.shape == hidden.shape
    assert abs(dropped.float().mean().item() - p) < 0.01
    # every quarter of the 16-bit chunks is drawn as often (no biased lane)
    flat = dropped.flatten()[: dropped.numel() // 4 * 4].view(-1, 4).float().mean(0)
    assert torch.allclose(flat, torch.full((4,), p), atol=0.02), flat
    kept = ~dropped
    torch.testing.assert_close(out[kept], (hidden[kept].float() / (1 - p)).to(dtype))


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    hidden = torch.randn(64, 50, requires_grad=True)
    out = apply_dropout(hidden, 0.25)
    out.sum().backward()
    expected = (out != 0).float() / 0.75
    torch.testing.assert_close(hidden.grad, expected)


def test_seeded_draws_repeat_and_eval_is_identity():
    hidden = torch.randn(10, 20)
    torch.manual_seed(5)
    first = apply_dropout(hidden, 0.3)
    torch.manual_seed(5)
    assert torch.equal(first, apply_dropout(hidden, 0.3))
    assert not torch.equal(first, apply_dropout(hidden, 0.3))  # the generator moved on
    layer = AlbefDropout(0.3).eval()
    assert layer(hidden) is hidden
    assert apply_dropout(hidden, 0.0) is hidden
    assert torch.equal(apply_dropout(hidden, 1.0), torch.zeros_like(hidden))
