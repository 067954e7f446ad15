"""Unit-test fixtures: no Ray. A small byte-level BPE trained in-process on real Tatoeba text, a tiny embedding model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_tokenizer(data_root):
    """A 1,024-token BPE trained on 4,000 real sentences of 4 languages (a second, no Ray)."""
    from conan.data.public_sets import tatoeba_lines
    from conan.tokenizer import train_tokenizer_from_iterator

    texts = [line for code in ("deu", "fra", "cmn", "ara")
             for side in (code, "eng") for line in tatoeba_lines(data_root / "tatoeba" / f"tatoeba.{code}-eng.{side}",
                                                                  "train")[:500]]
    return train_tokenizer_from_iterator(texts, 1024)


@pytest.fixture(scope="session")
def small_embedding_model_dir(tmp_path_factory, small_tokenizer):
    """A randomly initialised tiny embedding model exported like the embedding stages export."""
    import torch

    from conan.model import ConanConfig, ConanForEmbedding

    out = tmp_path_factory.mktemp("unit_embedding_model") / "model"
    torch.manual_seed(0)
    model = ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=len(small_tokenizer),
                                                      attention_mode="bidirectional"))
    model.save_pretrained(str(out))
    small_tokenizer.save_pretrained(str(out))
    return out
