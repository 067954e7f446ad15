"""The Conan decoder: preset sizes, forward/backward, pooling, Matryoshka, save/load, Auto classes."""

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conan.model import ConanConfig, ConanForCausalLM, ConanForEmbedding, ConanModel, count_parameters
from conan.model.pooling import last_token_pool, matryoshka_truncate, mean_pool


def test_1_4b_preset_matches_paper():
    config = ConanConfig.from_preset("conan-1.4b")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size,
            config.max_position_embeddings) == (8, 3584, 32, 8, 8192, 150_000, 32_768)
    n = count_parameters(config)
    assert 1.45e9 <= n <= 1.55e9, n
    # Tied embeddings: 150k × 3584 counted once; 8 layers of attention (GQA) + SwiGLU + 2 norms.
    per_layer = 2 * 3584 * 3584 + 2 * 3584 * 896 + 3 * 3584 * 8192 + 2 * 3584
    assert n == 150_000 * 3584 + 8 * per_layer + 3584


def _tiny(**kw):
    torch.manual_seed(0)
    return ConanConfig.from_preset("tiny", vocab_size=512, **kw)


def _batch(vocab=512):
    torch.manual_seed(3)
    ids = torch.randint(3, vocab, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[3, 4:] = 0
    return ids, mask


def test_tiny_causal_lm_forward_backward_and_learns():
    model = ConanForCausalLM(_tiny())
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, mask, labels=labels)
    assert out.logits is None  # training with labels: the fused head makes no logits tensor (test_lm_loss)
    assert model.eval()(ids, mask).logits.shape == (4, 16, 512)
    model.train()
    # An untrained model's loss is close to uniform: log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.5
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out.loss.item()
    for _ in range(20):
        opt.zero_grad()
        loss = model(ids, mask, labels=labels).loss
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first  # memorises the batch


def test_lm_head_is_tied_to_embeddings():
    model = ConanForCausalLM(_tiny())
    ids, mask = _batch()
    hidden = model.model(ids, mask).last_hidden_state
    torch.testing.assert_close(model(ids, mask).logits, hidden @ model.model.embed_tokens.weight.T)


def test_pooling_over_non_padding_tokens():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask)[1], hidden[1, :2].mean(0))
    torch.testing.assert_close(last_token_pool(hidden, mask), torch.stack([hidden[0, 3], hidden[1, 1]]))


def test_matryoshka_truncation_renormalises():
    x = torch.randn(5, 128)
    for dim in (32, 64, 128):
        y = matryoshka_truncate(x, dim)
        assert y.shape == (5, dim)
        torch.testing.assert_close(y.norm(dim=-1), torch.ones(5))
        torch.testing.assert_close(y, x[:, :dim] / x[:, :dim].norm(dim=-1, keepdim=True))


def test_embedding_head_modes_pooling_and_dims():
    ids, mask = _batch()
    for pooling in ("mean", "last"):
        model = ConanForEmbedding(_tiny(pooling=pooling)).eval()
        full = model(ids, mask)
        assert full.shape == (4, 128)
        torch.testing.assert_close(full.norm(dim=-1), torch.ones(4))
        small = model(ids, mask, dim=32)
        hidden = model.model(ids, mask, attention_mode="bidirectional").last_hidden_state
        pooled = mean_pool(hidden, mask) if pooling == "mean" else last_token_pool(hidden, mask)
        torch.testing.assert_close(small, F.normalize(pooled[:, :32], dim=-1))


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    model = ConanForEmbedding(_tiny()).eval()
    ids, mask = _batch()
    before = model(ids, mask, attention_mode="soft", soft_mask_alpha=0.3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = ConanForEmbedding.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids, mask, attention_mode="soft", soft_mask_alpha=0.3), before)


def test_auto_classes_load_a_saved_directory(tmp_path):
    lm = ConanForCausalLM(_tiny()).eval()
    lm.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "conan"
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, ConanModel)
    assert torch.equal(base.embed_tokens.weight, lm.model.embed_tokens.weight)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = _batch()
    assert torch.equal(again(ids, mask).logits, lm(ids, mask).logits)
    # The embedding model loads the causal LM's weights (stage-to-stage hand-off).
    emb = ConanForEmbedding.from_pretrained(tmp_path)
    assert torch.equal(emb.model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)


def test_config_validation_messages():
    import pytest
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ConanConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="matryoshka_dims"):
        ConanConfig(hidden_size=128, matryoshka_dims=[256])
    with pytest.raises(ValueError, match="unknown model preset"):
        ConanConfig.from_preset("huge")
