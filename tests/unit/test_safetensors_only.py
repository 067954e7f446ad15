"""Conan loads model weights from safetensors only: a directory holding pickled weights (pytorch_model.bin) is refused
before anything is unpickled, by every loader (stage init, the encoder behind evaluation / serving / mining)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conan.config import ModelSpec
from conan.encoder import Encoder
from conan.model import ConanConfig, ConanForEmbedding
from conan.model.build import load_or_init
from conan.tokenizer import train_tokenizer_from_iterator


def test_pickled_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    model = ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=300))
    for name in ("safe", "pickled"):
        model.save_pretrained(tmp_path / name)
    pickled = tmp_path / "pickled"
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()

    loaded = load_or_init(ConanForEmbedding, ModelSpec(init_from=str(tmp_path / "safe")), tokenizer=None)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(OSError, match="safetensors"):
        load_or_init(ConanForEmbedding, ModelSpec(init_from=str(pickled)), tokenizer=None)
    train_tokenizer_from_iterator(["a few words of text"] * 20, 300).save_pretrained(str(pickled))
    with pytest.raises(OSError, match="safetensors"):
        Encoder(pickled)
