"""model.activation_checkpointing: the same gradients from a fraction of the activations kept for backward."""

from __future__ import annotations

import torch

from conan.config import ModelSpec
from conan.model import ConanConfig, ConanForCausalLM
from conan.model.build import load_or_init


def _saved_bytes_and_grads(model, ids) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes of the tensors autograd keeps for backward during one LM step, and the gradients it produces."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model(ids, labels=ids)
    assert output.logits is None  # a training step makes no logits tensor (lm_loss)
    loss = output.loss
    loss.backward()
    return saved[0], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointed_layers_keep_less_and_give_the_same_gradients(tmp_path):
    torch.manual_seed(0)
    ConanForCausalLM(ConanConfig.from_preset("tiny", vocab_size=300, num_hidden_layers=4)).save_pretrained(tmp_path)
    ids = torch.randint(3, 300, (2, 128))
    # As a stage builds it from the previous stage's export (from_pretrained alone gives eval mode, where the layers
    # skip checkpointing).
    plain = load_or_init(ConanForCausalLM, ModelSpec(init_from=str(tmp_path)), tokenizer=None)
    checkpointed = load_or_init(ConanForCausalLM, ModelSpec(init_from=str(tmp_path), activation_checkpointing=True),
                                tokenizer=None)
    assert checkpointed.model.gradient_checkpointing and not plain.model.gradient_checkpointing
    assert plain.training and checkpointed.training
    plain_bytes, plain_grads = _saved_bytes_and_grads(plain, ids)
    kept_bytes, grads = _saved_bytes_and_grads(checkpointed, ids)
    assert kept_bytes < 0.5 * plain_bytes, (kept_bytes, plain_bytes)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
