"""The LM head's fused, chunked cross-entropy equals the plain logits → log-softmax → shifted cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from conan.model import ConanConfig, ConanForCausalLM
from conan.model.lm_loss import causal_lm_loss, chunk_tokens


def _plain(hidden, weight, labels):
    """What ConanForCausalLM computed before the fused head: every logit, then the shifted cross-entropy."""
    return F.cross_entropy((hidden @ weight.T)[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100)


def _inputs(dtype=torch.float32):
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 16, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(100, 16)).to(dtype).requires_grad_()
    labels = torch.randint(0, 100, (3, 37))
    labels[0, 5:20] = -100  # a prompt, and a chunk of 7 whose tokens are all ignored
    labels[2] = -100  # a row with nothing to predict
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_loss_and_gradients_equal_the_plain_computation(chunk):
    hidden, weight, labels = _inputs()
    expected = _plain(hidden, weight, labels)
    grads = torch.autograd.grad(3.0 * expected, (hidden, weight))  # a scaled loss, as DeepSpeed's engine passes
    got = causal_lm_loss(hidden, weight, labels, chunk)
    fused = torch.autograd.grad(3.0 * got, (hidden, weight))
    torch.testing.assert_close(got, expected)
    for g, f in zip(grads, fused):
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-7)
    assert fused[0][2].abs().sum() == 0 and fused[0][0, 6:19].abs().sum() == 0  # ignored tokens get no gradient


def test_bf16_stays_within_bf16_rounding_of_the_plain_computation():
    hidden, weight, labels = _inputs(torch.bfloat16)
    expected, got = _plain(hidden, weight, labels), causal_lm_loss(hidden, weight, labels, 7)
    assert got.dtype == torch.float32 and abs(got.item() - expected.item()) < 1e-3
    grads = torch.autograd.grad(expected, (hidden, weight))
    fused = torch.autograd.grad(got, (hidden, weight))
    assert fused[1].dtype == torch.bfloat16
    for g, f in zip(grads, fused):
        assert (f.float() - g.float()).abs().max() < 0.05 * g.float().abs().max()


def test_without_grad_and_without_labels_left():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(hidden, weight, labels, 5), _plain(hidden, weight, labels))
    nothing = torch.full_like(labels, -100)
    assert math.isnan(causal_lm_loss(hidden, weight, nothing).item())
    assert math.isnan(_plain(hidden, weight, nothing).item())


def test_chunk_rule():
    assert chunk_tokens(2032, 128, 8192) == 256  # tiny: Liger's rule would make 31-token chunks
    assert chunk_tokens(32767, 3584, 150_000) == 32767 * 3584 // 150_000  # 1.4b at 32k: logits the size of the states
    assert chunk_tokens(10, 16, 100) == 10 and chunk_tokens(300, 1, 10 ** 9) == 256
    # On a GPU each chunk's pass over the head's fp32 gradient costs what ~400 tokens of matmuls do: 4,096 at least.
    assert chunk_tokens(16384, 3584, 150_000, "cuda") == 4096  # 1.4b at 4 × 4k: 4 chunks, not Liger's 42
    assert chunk_tokens(2032, 128, 8192, "cuda") == 2032 and chunk_tokens(2032, 128, 8192, "cpu") == 256
    assert chunk_tokens(10 ** 6, 3584, 150_000, "npu") == 10 ** 6 * 3584 // 150_000  # Liger's rule when larger


def test_causal_lm_trains_with_the_fused_head_and_returns_logits_when_not_training():
    """Tied head: the training step's loss and gradients (embedding table included) equal the plain logits'; in
    training with labels no logits tensor is returned, in eval both."""
    torch.manual_seed(0)
    model = ConanForCausalLM(ConanConfig.from_preset("tiny", vocab_size=512))
    ids = torch.randint(3, 512, (2, 24))
    labels = ids.clone()
    labels[1, 18:] = -100
    out = model(ids, labels=labels)
    assert model.training and out.logits is None
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    model.eval()
    evaluated = model(ids, labels=labels)
    assert evaluated.logits.shape == (2, 24, 512)
    torch.testing.assert_close(evaluated.loss, out.loss)
    plain = F.cross_entropy(evaluated.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, plain)
    for g, p in zip(grads, torch.autograd.grad(plain, list(model.parameters()))):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-6)
