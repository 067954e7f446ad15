"""Packed rows (texts back to back in one unpadded row, `documents` naming each token's text): the same states and
embeddings as the texts padded in a batch, on both attention kernels, under either pooling; the Encoder's packed
passes (what the server runs) give its padded vectors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conan.model import ConanConfig, ConanForEmbedding, ConanModel, attention
from conan.model.attention import GROUP_CALL_COST, length_groups

LENGTHS = [5, 17, 1, 9, 30]


def _batch_and_row(vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids and mask for LENGTHS, and the same texts as one packed row with its documents."""
    torch.manual_seed(0)
    texts = [torch.randint(3, vocab, (n,)) for n in LENGTHS]
    ids = torch.zeros(len(texts), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, :len(t)], mask[i, :len(t)] = t, 1
    documents = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor(LENGTHS))
    return ids, mask, torch.cat(texts)[None], documents


def test_length_groups_split_the_texts_sorted_by_size_where_padding_costs_more_than_a_call():
    # Sizes 1, 5, 9, 17, 30: one group pads all five to 30 (5 · 900 + 2048 = 6548); [1, 5, 9] + [17, 30] costs
    # 3 · 81 + 2 · 900 + 2 · 2048 = 6139, the least of the 16 splits of the sorted sizes.
    assert length_groups(LENGTHS, 2048) == [[0, 2, 3], [1, 4]]
    ordered = sorted(LENGTHS)
    splits = [[ordered[a:b] for a, b in zip((0, *cuts), (*cuts, 5))]
              for k in range(5) for cuts in itertools.combinations(range(1, 5), k)]
    assert min(sum(len(g) * g[-1] ** 2 + 2048 for g in split) for split in splits) == 6139
    assert length_groups(LENGTHS, 10**9) == [[0, 1, 2, 3, 4]]
    assert length_groups(LENGTHS, 0) == [[2], [0], [3], [1], [4]]  # free calls: one group per size, shortest first
    assert length_groups([7, 3, 7, 3], 0) == [[1, 3], [0, 2]]  # like sizes share a group, texts in row order
    sizes = [int(n) for n in torch.randint(1, 200, (64,), generator=torch.Generator().manual_seed(0))]
    groups = length_groups(sizes)
    assert sorted(i for g in groups for i in g) == list(range(64)) and all(g == sorted(g) for g in groups)
    cost = sum(len(g) * max(sizes[i] for i in g) ** 2 + GROUP_CALL_COST for g in groups)
    assert 1 < len(groups) < 64 and cost < len(sizes) * max(sizes) ** 2 + GROUP_CALL_COST


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("mode", ["bidirectional", "causal", "soft"])
@pytest.mark.parametrize("call_cost", [0, 2048, 10**9])  # one group per size (out of row order), two, one
def test_a_packed_row_gives_each_text_its_padded_states(backend, mode, call_cost, monkeypatch):
    monkeypatch.setattr(attention, "GROUP_CALL_COST", call_cost)
    torch.manual_seed(1)
    model = ConanModel(ConanConfig.from_preset("tiny", vocab_size=300, attention_backend=backend)).eval()
    ids, mask, row, documents = _batch_and_row()
    soft = {"soft_mask_alpha": 0.3} if mode == "soft" else {}  # half open: l / i ≥ 1 / 0.3 only for i ≤ 9 of 30
    with torch.no_grad():
        padded = model(ids, mask, attention_mode=mode, **soft).last_hidden_state
        packed = model(row, attention_mode=mode, documents=documents, **soft).last_hidden_state[0]
    expected = torch.cat([padded[i, :n] for i, n in enumerate(LENGTHS)])
    assert (packed - expected).abs().max() < 1e-5
    # Not the same as attending across texts: without `documents` the row's states differ.
    with torch.no_grad():
        unpacked = model(row, attention_mode=mode, **soft).last_hidden_state[0]
    assert (unpacked - expected).abs().max() > 1e-2
    if mode == "soft":  # nor as the soft mask with l = each text's own length (a batch pads to its longest)
        with torch.no_grad():
            alone = [model(ids[i:i + 1, :n], attention_mode=mode, **soft).last_hidden_state[0]
                     for i, n in enumerate(LENGTHS)]
        assert (torch.cat(alone) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_packed_embeddings_equal_padded_ones_at_every_dim(pooling):
    torch.manual_seed(2)
    model = ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=300, pooling=pooling)).eval()
    ids, mask, row, documents = _batch_and_row()
    with torch.no_grad():
        for dim in (None, 32):
            padded = model(ids, mask, dim=dim)
            packed = model(row, documents=documents, dim=dim)
            assert packed.shape == padded.shape and (packed - padded).abs().max() < 1e-6


def test_packed_rows_refuse_what_they_cannot_mean():
    model = ConanModel(ConanConfig.from_preset("tiny", vocab_size=300, max_position_embeddings=20)).eval()
    ids, mask, row, documents = _batch_and_row()
    short = documents < 4  # the first four texts: 32 tokens, none over 20
    with pytest.raises(ValueError, match="batch 1"):
        model(ids[:, :4], mask[:, :4], documents=documents[:4])
    # The limit applies to each text, not to the row: 30 tokens is over 20, the other texts together are not.
    with pytest.raises(ValueError, match="sequence length 30"):
        model(row, documents=documents)
    assert model(row[:, short], documents=documents[short]).last_hidden_state.shape == (1, 32, 128)


@pytest.mark.parametrize("documents, why", [([0, 0, 2, 2], "text 1 has no token"),
                                            ([0, 1, 1, 0], "out of row order"),
                                            ([1, 1, 2, 2], "does not start at 0")])
def test_documents_that_are_not_texts_in_row_order_are_refused(documents, why):
    model = ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=300)).eval()
    with pytest.raises(ValueError, match="in row order, each with a token"):
        model(torch.randint(3, 300, (1, 4)), documents=torch.tensor(documents))


def test_the_encoders_packed_passes_give_the_models_padded_vectors(small_embedding_model_dir, data_root):
    """encode (sorted, batch_size a packed pass) and encode_packed (one pass, given order) against the model's padded
    batch, the way sentence-transformers runs it."""
    from conan.encoder import Encoder

    encoder = Encoder(small_embedding_model_dir, batch_size=2)
    lines = (data_root / "tatoeba" / "tatoeba.deu-eng.deu").read_text(encoding="utf-8").splitlines()
    texts = [lines[0], "x", lines[1] * 40, lines[2], "日本語の文です。"]  # one text cut at max_length
    assert max(encoder.token_counts(texts)) > encoder.max_length
    batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt")
    for dim in (None, 32):
        with torch.no_grad():
            padded = encoder.model(batch["input_ids"], batch["attention_mask"], dim=dim).numpy()
        packed, passes = encoder.encode_packed(texts, dim), encoder.encode(texts, dim)
        assert packed.shape == passes.shape == padded.shape == (len(texts), dim or encoder.dimension)
        assert np.abs(packed - padded).max() < 1e-5 and np.abs(passes - padded).max() < 1e-5
    assert encoder.encode_packed([]).shape == encoder.encode([]).shape == (0, encoder.dimension)


def test_encode_tokenizes_one_block_at_a_time_and_keeps_input_order(small_embedding_model_dir, data_root,
                                                                      monkeypatch):
    """A corpus larger than SORT_BLOCK is tokenized a block at a time (never all its token ids at once) and each
    vector still lands at its text's index."""
    from conan.encoder import Encoder

    encoder = Encoder(small_embedding_model_dir, batch_size=2)
    lines = (data_root / "tatoeba" / "tatoeba.deu-eng.deu").read_text(encoding="utf-8").splitlines()
    texts = [lines[i] * (1 + i % 3) for i in range(11)]
    whole = encoder.encode(texts)
    monkeypatch.setattr(Encoder, "SORT_BLOCK", 4)
    tokenized = []
    token_ids = encoder.token_ids
    monkeypatch.setattr(encoder, "token_ids", lambda block: tokenized.append(len(block)) or token_ids(block))
    blocks = encoder.encode(texts)
    assert tokenized == [4, 4, 3]
    assert np.abs(blocks - whole).max() < 1e-5
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    assert np.abs(blocks - alone).max() < 1e-5
