"""The Llama export: stock transformers loads it with no custom code, and its logits are Conan's."""

from __future__ import annotations

import json

import torch

from conan.cli import main
from conan.model import ConanConfig, ConanForCausalLM
from conan.tokenizer import load_tokenizer, train_tokenizer_from_iterator

TEXTS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "Ray runs the training workers",
         "hard negatives come from the pool"] * 50


def test_llama_export_loads_without_custom_code_and_matches_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    train_tokenizer_from_iterator(TEXTS, 512).save_pretrained(str(tmp_path / "conan"))
    tokenizer = load_tokenizer(tmp_path / "conan")
    torch.manual_seed(0)
    conan = ConanForCausalLM(ConanConfig.from_preset("tiny", vocab_size=len(tokenizer), rope_theta=5_000.0))
    with torch.no_grad():  # non-trivial norms, so a dropped or misplaced weight shows
        for module in conan.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    conan.save_pretrained(str(tmp_path / "conan"))
    assert main(["export", str(tmp_path / "conan"), "--format", "llama", "--out", str(tmp_path / "llama")]) == 0

    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    llama = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))  # trust_remote_code is off
    assert isinstance(llama, LlamaForCausalLM)
    batch = AutoTokenizer.from_pretrained(str(tmp_path / "llama"))(
        ["the lazy dog sat on the pool", "workers"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).tolist()[1] < batch["input_ids"].shape[1]  # one row is right-padded
    with torch.no_grad():
        expected = conan.eval()(batch["input_ids"], batch["attention_mask"]).logits
        got = llama.eval()(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4), (got[real] - expected[real]).abs().max()
    assert got.abs().max() > 0.1  # not a degenerate comparison of zeros
    print(f"max |Δ logit| {(got[real] - expected[real]).abs().max():.2e}")


def test_llama_export_needs_an_output_directory(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "llama"]) == 2
    assert "--out" in capsys.readouterr().err
