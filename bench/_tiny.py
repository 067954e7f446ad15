"""Shared by the benchmarks: a randomly initialised tiny embedding model with a BPE trained on given texts."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from conan.model import ConanConfig, ConanForEmbedding
from conan.tokenizer import load_tokenizer, train_tokenizer_from_iterator


def tiny_embedding_model(texts: Iterable[str], out: Path, vocab_size: int = 8192, **config) -> Path:
    """Save tokenizer + tiny model (bidirectional, seed 0, `config` overriding the preset) to `out`; speed benchmarks
    need no training."""
    train_tokenizer_from_iterator(texts, vocab_size).save_pretrained(str(out))
    tokenizer = load_tokenizer(out)
    torch.manual_seed(0)
    ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=len(tokenizer),
                                              attention_mode="bidirectional", **config)).save_pretrained(str(out))
    return out
