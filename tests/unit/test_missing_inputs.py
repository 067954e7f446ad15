"""A missing model, tokenizer or input is one clear line naming it (and what writes a model or tokenizer), from every
command, before any Ray or training work starts."""

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


NOPE = "/nonexistent/conan"
MISSING_MODEL = f"{NOPE}/model: no exported model here (no config.json); `make demo` writes"
# (command line, the line's start, what else it names); every input is missing, so `make demo` need not have run.
MISSING = [
    *[(["train", stage, "--config", f"jobs/configs/{stage}_tiny.yaml", "--set", f"model.init_from={NOPE}/model"],
       f"conan train: error: model.init_from: {MISSING_MODEL}", "conan train <stage>") for stage in
      ("pretrain", "sft", "weak", "supervised")],
    (["train", "pretrain", "--config", "jobs/configs/pretrain_tiny.yaml", "--set", "model.init_from=null",
      "--set", f"tokenizer.path={NOPE}/tok"], f"conan train: error: tokenizer.path: no tokenizer at {NOPE}/tok",
     "conan tokenizer"),
    (["shard", "weak", "--config", "jobs/configs/weak_tiny.yaml", "--set", f"model.init_from={NOPE}/model"],
     f"conan shard: error: model.init_from: {MISSING_MODEL}", "make demo"),
    (["mine", "--config", "jobs/configs/supervised_tiny.yaml", "--set", f"model.init_from={NOPE}/model"],
     f"conan mine: error: model.init_from: {MISSING_MODEL}", "make demo"),
    (["sweep", "--config", "jobs/configs/sweep_mask_tiny.yaml", "--set", f"overrides=[model.init_from={NOPE}/model]"],
     f"conan sweep: error: model.init_from: {MISSING_MODEL}", "make demo"),
    (["ablation", "--config", "jobs/configs/ablation_tiny.yaml", "--set",
      f"overrides=[model.init_from={NOPE}/model]"], f"conan ablation: error: model.init_from: {MISSING_MODEL}",
     "make demo"),
    (["export", f"{NOPE}/model", "--format", "llama", "--out", "x"], f"conan export: error: {MISSING_MODEL}",
     "make demo"),
    (["curate", "--config", "jobs/configs/curate_tiny.yaml", "--set", f"inputs=[{NOPE}/pairs.jsonl]"],
     f"conan curate: error: inputs: {NOPE}/pairs.jsonl does not exist", ""),
    (["clr", "--config", "jobs/configs/clr_tiny.yaml", "--set", f"inputs=[{NOPE}/triples.parquet]"],
     f"conan clr: error: inputs: {NOPE}/triples.parquet does not exist", ""),
    (["tokenizer", f"{NOPE}/corpus.parquet", "--out", "tok"],
     f"conan tokenizer: error: conan tokenizer inputs: {NOPE}/corpus.parquet does not exist", ""),
]


@pytest.mark.parametrize("argv, start, names", MISSING, ids=lambda x: " ".join(x[:2]) if isinstance(x, list) else "")
def test_every_command_names_a_missing_input_in_one_line(argv, start, names, tmp_path, capsys, monkeypatch):
    import conan.runtime
    import conan.train.launcher

    def no_ray(*_, **__):
        raise AssertionError("Ray was joined before the missing input was named")
    for module in (conan.runtime, conan.train.launcher):  # every command joins Ray through init_ray
        monkeypatch.setattr(module, "init_ray", no_ray)
    args = list(argv)
    if argv[0] in ("train", "shard", "mine", "sweep", "ablation", "curate", "clr"):
        args += ["--set", f"output_dir={tmp_path / 'out'}"]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start) and names in err[0], err
    assert "failed:" not in captured.out  # no pointer to a log for an error the line says in full


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


@pytest.mark.parametrize("override, line", [
    ("supervised.task_weights.retreival=3.0", "supervised.task_weights: unknown task 'retreival'"),
    ("supervised.batch_sizes={retrieval: 16}", "supervised.batch_sizes: no batch size for task 'classification'")])
def test_a_misspelt_or_unsized_task_is_one_line_before_ray(override, line, small_tokenizer, tmp_path, capsys,
                                                           monkeypatch):
    """A misspelt task trained at weight 0 without a word; a weighted task without a batch size failed in a worker."""
    import conan.runtime
    import conan.train.launcher

    small_tokenizer.save_pretrained(str(tmp_path / "tok"))
    for module in (conan.runtime, conan.train.launcher):
        monkeypatch.setattr(module, "init_ray", lambda *_, **__: pytest.fail("Ray was joined"))
    assert main(["train", "supervised", "--config", "jobs/configs/supervised_tiny.yaml", "--set", "model.init_from=null",
                 "--set", f"tokenizer.path={tmp_path / 'tok'}", "--set", f"output_dir={tmp_path / 'out'}",
                 "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"conan train: error: {line}"), err


@pytest.mark.parametrize("argv, line", [(["--sources", "wiki"], "unknown corpus source 'wiki'"),
                                        (["--max-per-source", "0"], "the cap on texts per source must be at least 1")])
def test_a_bad_corpus_request_is_one_line(argv, line, tmp_path, capsys):
    """A cap of 0 or less wrote one text per source; an unknown source was a traceback."""
    assert main(["corpus", "--out", str(tmp_path / "c.parquet"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"conan corpus: error: {line}"), err
    assert not (tmp_path / "c.parquet").exists()


WRONG_VALUES = [
    (["model-info", "--preset", "huge"], "model: unknown model preset 'huge'"),
    (["tokenizer", "CORPUS", "--out", "OUT/tok", "--vocab-size", "10"], "vocab_size 10 must leave room"),
    (["evaluate", "--config", "jobs/configs/eval_tiny.yaml", "--set", "tasks=[xquad-retreival]"],
     "tasks[0]: expected one of ['xquad-retrieval', "),
    (["clr", "--config", "jobs/configs/clr_tiny.yaml", "--set", "backend=hf"],
     "model: backend hf translates with a model"),
    (["curate", "--config", "jobs/configs/curate_tiny.yaml", "--set", f"score_model={NOPE}/scorer"],
     f"score_model: {NOPE}/scorer does not exist"),
    (["pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", "--set", "model.preset=huge"],
     "model: unknown model preset 'huge'"),
    (["pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", "--set", "model.overrides={num_attention_heads: 3}"],
     "model: hidden_size 128 is not divisible by num_attention_heads 3"),
    (["pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", "--set", "tokenizer.vocab_size=10"],
     "vocab_size 10 must leave room"),
    *[(argv, "stage: jobs/configs/weak_tiny.yaml configures stage 'weak', not ") for argv in (
        ["shard", "supervised", "--config", "jobs/configs/weak_tiny.yaml"], ["demo", "sft", "--config",
                                                                              "jobs/configs/weak_tiny.yaml"],
        ["mine", "--config", "jobs/configs/weak_tiny.yaml"])],
    (["pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", "--set", f"model.init_from={NOPE}/model"],
     "model.init_from: the pipeline builds its own initial model"),
]


@pytest.mark.parametrize("argv, line", WRONG_VALUES, ids=lambda x: " ".join(x[:1] + x[-1:]) if isinstance(x, list) else "")
def test_a_wrong_value_is_one_line_before_ray(argv, line, tmp_path, capsys, monkeypatch):
    """Each was a traceback, the tokenizer's and the curation's after Ray had started (the curation's after its
    whole Ray pipeline ran), the pipeline's after the corpus and tokenizer steps."""
    import conan.runtime
    import conan.train.launcher

    for module in (conan.runtime, conan.train.launcher):
        monkeypatch.setattr(module, "init_ray", lambda *_, **__: pytest.fail("Ray was joined"))
    (tmp_path / "corpus.txt").write_text("a text\n")
    args = [a.replace("CORPUS", str(tmp_path / "corpus.txt")).replace("OUT", str(tmp_path)) for a in argv]
    if argv[0] not in ("model-info", "tokenizer"):
        args += ["--set", f"output_dir={tmp_path / 'out'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"conan {argv[0]}: error: {line}"), err
    written = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert written in ([], ["logs"]) and not (tmp_path / "tok").exists()  # the command's log, no data


def test_a_config_naming_no_stage_takes_the_commands(tmp_path):
    """Only a config that names another stage is refused (a file without `stage:` is not a pretraining config)."""
    from types import SimpleNamespace

    from conan.cli import stage_config

    text = "\n".join(line for line in open("jobs/configs/supervised_tiny.yaml").read().splitlines()
                     if not line.startswith("stage:"))
    (tmp_path / "nostage.yaml").write_text(text)
    cfg = stage_config(SimpleNamespace(config=str(tmp_path / "nostage.yaml"), overrides=[]), "supervised")
    assert cfg.stage == "supervised" and cfg.supervised.batch_sizes["retrieval"] == 16


def test_pipeline_from_a_step_keeps_the_outputs_when_a_config_is_wrong(tmp_path, capsys):
    """--from removed the later steps' outputs, then the config check refused the run."""
    for step in ("weak", "supervised"):
        (tmp_path / "out" / step).mkdir(parents=True)
    assert main(["pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", "--from", "weak", "--set",
                 f"output_dir={tmp_path / 'out'}", "--set", f"model.init_from={NOPE}/model"]) == 2
    assert "model.init_from: the pipeline builds its own initial model" in capsys.readouterr().err
    assert (tmp_path / "out" / "weak").is_dir() and (tmp_path / "out" / "supervised").is_dir()


def test_a_passage_corpus_that_is_not_one_is_one_line(tmp_path):
    """dhnm.passages must be parquet with a `text` column (a JSON-lines file, another column name: IndexError and
    ArrowInvalid tracebacks from the passage lookup)."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conan.config import ConfigError, JobConfig, load_config
    from conan.train.launcher import check_passages

    (tmp_path / "passages.jsonl").write_text('{"text": "a passage"}\n')
    pq.write_table(pa.table({"passage": ["a passage"]}), tmp_path / "named.parquet")
    for path, says in ((tmp_path / "passages.jsonl", "is not a parquet file"),
                       (tmp_path / "named.parquet", "has no column `text` (has ['passage'])")):
        cfg = load_config(JobConfig, "jobs/configs/supervised_tiny.yaml", [f"dhnm.passages={path}"])
        with pytest.raises(ConfigError, match=re.escape(f"dhnm.passages: {path} {says}")):
            check_passages(cfg)
