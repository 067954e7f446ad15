"""The lr schedule's first step trains; SFT prompts keep their markers; encoders truncate at the training length."""

import pytest
import torch

from conan.config import JobConfig, load_config
from conan.train.backend import lr_multiplier, lr_scheduler
from conan.train.stages import prompt_ids


def test_first_optimizer_step_runs_at_lr_over_warmup():
    cfg = load_config(JobConfig, None, ["train.steps=100", "optim.warmup_ratio=0.05", "optim.lr=1e-3",
                                        "optim.min_lr_ratio=0.1"])
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    scheduler = lr_scheduler(cfg)(optimizer)
    seen = []
    for _ in range(100):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-3 / 5) and seen[1] == pytest.approx(2e-3 / 5)  # warmup: 5 steps
    assert seen[4] == pytest.approx(1e-3)  # the peak, at the last warmup step
    assert seen[-1] == pytest.approx(1e-4)  # cosine down to min_lr_ratio at the last step
    assert all(a >= b for a, b in zip(seen[4:], seen[5:]))
    assert lr_multiplier(0, 10, 1, 0.0) == 1.0  # no warmup to speak of: the first step at the peak


def test_sft_prompt_keeps_its_three_markers_when_cut():
    markers = (3, 4, 5)
    long_input = list(range(100, 300))
    prompt = prompt_ids([10, 11, 12], long_input, 32, markers)
    assert len(prompt) == 32 and prompt[0] == 3 and prompt[4] == 4 and prompt[-1] == 5
    assert prompt[1:4] == [10, 11, 12] and prompt[5:-1] == long_input[:26]
    long_instruction = prompt_ids(list(range(100, 150)), [7, 8], 20, markers)
    assert long_instruction.count(3) == long_instruction.count(4) == long_instruction.count(5) == 1
    assert long_instruction[-3:] == [7, 8, 5] and len(long_instruction) == 13
    short = prompt_ids([1], [2], 32, markers)
    assert short == [3, 1, 4, 2, 5]


def test_encoder_truncates_at_the_training_length(small_embedding_model_dir, tmp_path):
    import shutil

    import numpy as np

    from conan.encoder import Encoder
    from conan.model import ConanConfig

    untrained = Encoder(small_embedding_model_dir)
    assert untrained.max_length == ConanConfig.from_pretrained(small_embedding_model_dir).max_position_embeddings
    trained = tmp_path / "model"
    shutil.copytree(small_embedding_model_dir, trained)
    config = ConanConfig.from_pretrained(trained)
    config.max_seq_length = 24  # what the loop's export writes: the stage's data.seq_len
    config.save_pretrained(trained)
    assert Encoder(trained).max_length == 24 and Encoder(trained, max_length=64).max_length == 64
    text = ["the cat sat on the mat and looked at the dog " * 10]
    np.testing.assert_array_equal(Encoder(trained).encode(text), Encoder(trained, max_length=24).encode(text))
    assert not np.allclose(Encoder(trained).encode(text), untrained.encode(text), atol=1e-3)
