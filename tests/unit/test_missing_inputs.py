"""A missing model directory is one clear line naming it and what writes one, from every command that loads a model."""

from __future__ import annotations

import pytest

from conan.cli import main


@pytest.mark.parametrize("command, config", [("serve", "jobs/configs/serve_tiny.yaml"),
                                             ("evaluate", "jobs/configs/eval_tiny.yaml")])
def test_missing_model_is_one_line_naming_it(command, config, tmp_path, capsys):
    missing = tmp_path / "no-model"
    output = ["--set", f"output_dir={tmp_path / 'out'}"] if command == "evaluate" else []
    assert main([command, "--config", config, "--set", f"model_dir={missing}", *output]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"conan {command}: error: {missing}: no exported model here"), err
    assert "make demo" in err[0]


def test_configs_after_the_demo_point_at_what_it_writes():
    """`conan serve` / `conan evaluate` with the shipped configs load the model `make demo` exports (the pipeline
    config's output_dir, its last stage's model)."""
    import yaml

    def load(path):
        with open(path) as f:
            return yaml.safe_load(f)

    demo = load("jobs/configs/pipeline_tiny.yaml")
    exported = f"{demo['output_dir']}/{load(demo['stages'][-1])['stage']}/model"
    for config in ("jobs/configs/serve_tiny.yaml", "jobs/configs/eval_tiny.yaml"):
        assert load(config)["model_dir"] == exported, config
