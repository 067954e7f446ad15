"""Soft mask (eq. 3-4, App. C): matrix values, schedule endpoints, equivalence with plain attention."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conan.model import ConanConfig, ConanForEmbedding
from conan.model.attention import AttentionMask, attention_kernel, flex_attention_available
from conan.model.soft_mask import (SCHEDULES, is_fully_open, soft_mask_alpha, soft_mask_bias,
                                   soft_mask_matrix, soft_mask_score_mod)

TAU = 90


def eq4(length: int, alpha: float) -> np.ndarray:
    """Eq. 4 written entry by entry, 1-indexed."""
    m = np.zeros((length, length))
    for i in range(1, length + 1):
        for j in range(1, length + 1):
            m[i - 1, j - 1] = 1.0 if i >= j else min(alpha * length / i, 1.0)
    return m


def test_alpha_schedules_match_appendix_c():
    for t in (0, 10, 30, 45, 90):
        x = t / TAU
        assert soft_mask_alpha(t, TAU, "linear") == pytest.approx(x)
        assert soft_mask_alpha(t, TAU, "accelerating") == pytest.approx(x * x)
        assert soft_mask_alpha(t, TAU, "decelerating") == pytest.approx(1 - (1 - x) ** 2)
    assert soft_mask_alpha(200, TAU) == 1.0  # clamped past tau
    with pytest.raises(ValueError, match="schedule"):
        soft_mask_alpha(1, TAU, "cubic")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("length", [1, 7, 64])
@pytest.mark.parametrize("t", [0, TAU // 3, TAU])
def test_matrix_matches_eq4(schedule, length, t):
    alpha = soft_mask_alpha(t, TAU, schedule)
    got = soft_mask_matrix(length, alpha, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, eq4(length, alpha), rtol=0, atol=1e-12)
    if t == 0:
        np.testing.assert_array_equal(got, np.tril(np.ones((length, length))))  # exactly causal
    if t == TAU:
        np.testing.assert_array_equal(got, np.ones((length, length)))  # exactly bidirectional


def test_values_at_a_third_for_length_7():
    m = soft_mask_matrix(7, 1 / 3, dtype=torch.float64)
    # Row i=1: 1/3 * 7 / 1 > 1 → 1; row i=3: 7/9; row i=6: 7/18.
    assert m[0, 1:].tolist() == [1.0] * 6
    assert m[2, 3].item() == pytest.approx(7 / 9)
    assert m[5, 6].item() == pytest.approx(7 / 18)


def test_without_rank_reduction_upper_triangle_is_alpha():
    m = soft_mask_matrix(5, 0.25, rank_reduction=False, dtype=torch.float64)
    assert torch.equal(m.triu(1), torch.full((5, 5), 0.25, dtype=torch.float64).triu(1))


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_bias_is_log_of_matrix(alpha):
    bias = soft_mask_bias(9, alpha, dtype=torch.float64)
    m = soft_mask_matrix(9, alpha, dtype=torch.float64)
    assert torch.equal(torch.isneginf(bias), m == 0)
    np.testing.assert_allclose(bias[m > 0].exp().numpy(), m[m > 0].numpy(), rtol=1e-12)


@pytest.mark.parametrize("rank_reduction", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.9])
def test_flex_score_mod_adds_the_bias(alpha, rank_reduction):
    """FlexAttention's score_mod, called as the kernel does (index tensors broadcast over a score block), adds
    log M(t)."""
    length = 11
    q_idx, kv_idx = torch.arange(length)[:, None], torch.arange(length)[None, :]
    scores = torch.randn(length, length)
    got = soft_mask_score_mod(length, alpha, rank_reduction)(scores, 0, 0, q_idx, kv_idx)
    expected = scores + soft_mask_bias(length, alpha, rank_reduction)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
    torch.testing.assert_close(got[got.isfinite()], expected[expected.isfinite()])


def test_flex_score_mod_holds_alpha_and_length_in_a_tensor():
    """A compiled kernel guards on the Python constants its score_mod closes over; alpha moves every step and the
    padded length every batch, so both must reach it as tensor values (else it recompiles each step: on an H200,
    8 graphs and 39.8 s instead of 15.6 s over 6 lengths)."""
    def constants(mod):
        return [c.cell_contents for c in mod.__closure__ if not isinstance(c.cell_contents, torch.Tensor)]
    a, b = soft_mask_score_mod(64, 0.3), soft_mask_score_mod(96, 0.7)
    assert constants(a) == constants(b)
    assert any(isinstance(c.cell_contents, torch.Tensor) for c in a.__closure__)


@pytest.mark.parametrize("length", [2, 7, 64])
def test_fully_open_exactly_when_every_entry_is_one(length):
    for alpha in np.linspace(0, 1, 41).tolist() + [(length - 1) / length]:
        for rr in (True, False):
            assert is_fully_open(length, alpha, rr) == bool((soft_mask_matrix(length, alpha, rr) == 1).all())


def _model(backend="sdpa", seed=0):
    torch.manual_seed(seed)
    return ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=300, attention_backend=backend)).eval()


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _states(model, ids, mask, mode, alpha=0.0):
    return model.model(ids, mask, attention_mode=mode, soft_mask_alpha=alpha).last_hidden_state


def test_soft_at_zero_equals_causal_path():
    model, (ids, mask) = _model(), _batch()
    with torch.no_grad():
        soft, causal = _states(model, ids, mask, "soft", 0.0), _states(model, ids, mask, "causal")
    real = mask.bool()
    torch.testing.assert_close(soft[real], causal[real], atol=1e-5, rtol=0)


def test_soft_bias_at_tau_equals_bidirectional_attention():
    """The float-bias path itself (not the shortcut) at alpha=1 equals plain bidirectional SDPA."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 4, 12, 16) for _ in range(3))
    _, mask = _batch()
    keys = mask.bool()[:, None, None, :]
    bias = soft_mask_bias(12, 1.0).masked_fill(~keys, float("-inf"))
    soft = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    bidir = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
    torch.testing.assert_close(soft, bidir, atol=1e-6, rtol=0)
    model = _model()
    with torch.no_grad():
        torch.testing.assert_close(_states(model, *_batch(), "soft", 1.0),
                                   _states(model, *_batch(), "bidirectional"), atol=1e-5, rtol=0)


def test_fully_open_soft_mask_runs_plain_bidirectional():
    _, mask = _batch()
    assert AttentionMask("soft", mask.bool(), 1.0).effective_mode(12) == "bidirectional"
    assert AttentionMask("soft", mask.bool(), 10 / 12).effective_mode(12) == "soft"
    assert AttentionMask("soft", None, 11 / 12).sdpa_arguments(12, torch.float32, "cpu")["attn_mask"] is None


def test_intermediate_alpha_differs_from_both_endpoints():
    model, (ids, mask) = _model(), _batch()
    with torch.no_grad():
        mid = _states(model, ids, mask, "soft", 0.3)
        causal, bidir = _states(model, ids, mask, "causal"), _states(model, ids, mask, "bidirectional")
    assert (mid - causal).abs().max() > 1e-3 and (mid - bidir).abs().max() > 1e-3


@pytest.mark.parametrize("mode,alpha", [("causal", 0.0), ("bidirectional", 0.0), ("soft", 0.0), ("soft", 0.4)])
def test_padding_is_never_attended(mode, alpha):
    model, (ids, mask) = _model(), _batch()
    noisy = ids.clone()
    noisy[mask == 0] = torch.randint(3, 300, (int((mask == 0).sum()),))
    with torch.no_grad():
        a, b = _states(model, ids, mask, mode, alpha), _states(model, noisy, mask, mode, alpha)
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)


@pytest.mark.skipif(not flex_attention_available(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("mode,alpha", [("causal", 0.0), ("bidirectional", 0.0), ("soft", 0.25), ("soft", 0.0)])
def test_flex_and_sdpa_paths_agree(mode, alpha):
    sdpa, flex = _model("sdpa"), _model("flex")
    flex.load_state_dict(sdpa.state_dict())
    ids, mask = _batch()
    with torch.no_grad():
        a, b = _states(sdpa, ids, mask, mode, alpha), _states(flex, ids, mask, mode, alpha)
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)


def test_auto_backend_runs_the_soft_mask_in_flex_on_cuda_only():
    """'auto' (the default) compiles FlexAttention for the soft mask on CUDA; SDPA's flash kernels keep the rest, and
    CPU and NPU keep SDPA (eager FlexAttention is the slow reference there)."""
    cuda, cpu, npu = torch.device("cuda", 0), torch.device("cpu"), torch.device("privateuseone", 0)  # torch_npu's
    assert ConanConfig().attention_backend == "auto"
    assert attention_kernel("auto", "soft", cuda) == "flex"
    assert [attention_kernel("auto", m, cuda) for m in ("causal", "bidirectional")] == ["sdpa", "sdpa"]
    assert [attention_kernel("auto", "soft", d) for d in (cpu, npu)] == ["sdpa", "sdpa"]
    assert attention_kernel("flex", "causal", cpu) == "flex" and attention_kernel("sdpa", "soft", cuda) == "sdpa"
    # A fully open soft mask is plain bidirectional attention, so auto hands it to SDPA's flash kernel.
    assert AttentionMask("soft", None, alpha=1.0).effective_mode(64) == "bidirectional"


def test_soft_mask_gradients_flow():
    model, (ids, mask) = _model(), _batch()
    model.train()
    emb = model(ids, mask, attention_mode="soft", soft_mask_alpha=0.5)
    emb.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert math.isfinite(float(emb.detach().sum()))
