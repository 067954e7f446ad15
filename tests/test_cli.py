"""The `conan` command: --help everywhere, and the pipeline's first steps on real data."""

import subprocess
import sys

import pytest

from conan.cli import build_parser, main

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "conan.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0
    assert all(name in out.stdout for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    out = _run(name, "--help")
    assert out.returncode == 0 and f"usage: conan {name}" in out.stdout


def test_a_job_script_names_itself_and_asks_only_for_options():
    """`python jobs/weak.py` passes `train weak` itself: its usage must not ask for a stage, and --verbose exists only
    where a command keeps logs (demo, serve and evaluate have none)."""
    out = subprocess.run([sys.executable, "jobs/weak.py", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python jobs/weak.py [-h] [--config CONFIG]")
    assert "{pretrain" not in out.stdout and "--verbose" in out.stdout
    wrong = subprocess.run([sys.executable, "jobs/weak.py", "weak"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "python jobs/weak.py: error: unrecognized arguments: weak" in wrong.stderr
    assert all("--verbose" not in _run(name, "--help").stdout for name in ("demo", "serve", "evaluate"))


def test_model_info_prints_paper_size():
    out = _run("model-info", "--preset", "conan-1.4b")
    assert out.returncode == 0 and "conan-1.4b: 1,499,205,120 parameters" in out.stdout


def test_bad_override_is_a_clear_error(capsys):
    assert main(["pipeline", "--set", "tokenizer.vocab=3"]) == 2
    assert "tokenizer.vocab" in capsys.readouterr().err


@pytest.mark.parametrize("override, named", [("evaluation=/nonexistent/eval.yaml", "/nonexistent/eval.yaml"),
                                             ("stage_overrides=[train.stepz=3]", "train.stepz"),
                                             ("stage_overrides=[supervised.task_weights.stss=1.0]",
                                              "unknown task 'stss'")])
def test_a_later_steps_bad_config_is_one_line_before_the_first_step(override, named, tmp_path, capsys):
    """The evaluation's YAML (read after training) and the stages' overrides are checked before the corpus step."""
    assert main(["pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", "--set", f"output_dir={tmp_path}",
                 "--set", override]) == 2
    captured = capsys.readouterr()
    assert named in captured.err and "[pipeline] corpus" not in captured.out
    assert [p.name for p in tmp_path.iterdir()] == ["logs"]  # no step wrote anything


def test_pipeline_builds_tokenizer_and_model_then_skips(tmp_path, ray_cluster, capsys, data_root):
    from conan.model import ConanConfig

    args = ["pipeline", "--set", f"output_dir={tmp_path}", "--set", "corpus_max_per_source=2000",
            "--set", f"data_root={data_root}", "--set", "tokenizer.vocab_size=1024"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[pipeline] tokenizer: trained" in out
    config = ConanConfig.from_pretrained(tmp_path / "model_init")
    assert config.vocab_size == 1024 and config.hidden_size == 128
    assert f"{1024 * 128 + 2 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 256) + 128:,} parameters" in out
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("exists, skipped") == 3
    # Another vocabulary for the same run: refused (the tokenizer there has 1024), until --from redoes the tokenizer
    # and the steps after it.
    other = [*args[:-1], "tokenizer.vocab_size=2048"]
    assert main(other) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "step tokenizer: " in error and "tokenizer.vocab_size: 1024 → 2048" in error
    assert main([*other, "--from", "tokenizer"]) == 0
    assert ConanConfig.from_pretrained(tmp_path / "model_init").vocab_size == 2048


def test_pipeline_from_step_removes_that_step_and_later_ones(tmp_path):
    """--from weak removes weak, clr, mined, supervised and eval outputs and keeps the earlier steps."""
    from conan.pipeline import PIPELINE_STEPS, reset_from

    for folder in PIPELINE_STEPS.values():
        (tmp_path / folder).mkdir()
    removed = reset_from(tmp_path, "weak")
    assert sorted(p.name for p in removed) == ["clr", "eval", "mined", "supervised", "weak"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "curated", "model_init", "pretrain", "sft",
                                                           "tokenizer"]
    with pytest.raises(ValueError, match="unknown step"):
        reset_from(tmp_path, "nope")


def test_a_server_setting_or_an_export_option_that_cannot_work_is_one_line(embedding_model_dir, tmp_path, capsys):
    """A queue smaller than one request, or --out with the sentence-transformers format (it wrote into MODEL_DIR and
    left --out uncreated): exit 2 and one line, not a traceback."""
    assert main(["serve", "--set", f"model_dir={embedding_model_dir}", "--set", "max_queued_texts=2"]) == 2
    assert "max_queued_texts (2) must hold a request" in capsys.readouterr().err.splitlines()[-1]
    assert main(["export", str(embedding_model_dir), "--out", str(tmp_path / "copy")]) == 2
    assert "--out is for --format llama" in capsys.readouterr().err and not (tmp_path / "copy").exists()
