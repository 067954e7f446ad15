"""Typed configs: YAML + dotted overrides, unknown keys and wrong types named in the error."""

import pytest
import yaml

from conan.config import (AblationConfig, CLRConfig, ConfigError, CurationConfig, EvalConfig, JobConfig, PipelineConfig,
                          ServeConfig, SweepConfig, load_config)


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides_fill_typed_fields(tmp_path):
    path = _write(tmp_path, {"stage": "weak", "optim": {"lr": "2e-5"}, "train": {"steps": 30},
                             "model": {"overrides": {"num_hidden_layers": 4}}})
    cfg = load_config(JobConfig, path, ["train.micro_batch_size=4", "soft_mask.schedule=accelerating",
                                        "optim.betas=[0.9, 0.99]", "model.init_from=runs/sft/model"])
    assert cfg.stage == "weak" and cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 30 and cfg.train.micro_batch_size == 4
    assert cfg.soft_mask.schedule == "accelerating" and cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.overrides == {"num_hidden_layers": 4} and cfg.model.init_from == "runs/sft/model"
    assert cfg.train.checkpoint_every == JobConfig().train.checkpoint_every  # defaults kept


@pytest.mark.parametrize("override,key", [
    ("train.lrr=1", "train.lrr"),
    ("trian.steps=1", "trian"),
    ("optim.lr=fast", "optim.lr"),
    ("train.steps=1.5", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("soft_mask.schedule=cubic", "soft_mask.schedule"),
    ("soft_mask.enabled=3", "soft_mask.enabled"),
    ("optim.betas=[0.9, x]", "optim.betas[1]"),
    ("stage=finetune", "stage"),
    ("data.max_rows=many", "data.max_rows"),
    # Values out of range: a negative step count exported the untrained init; log_every=0 failed in a worker
    ("train.steps=-5", "train.steps: must be at least 1"),
    ("train.log_every=0", "train.log_every: must be at least 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.num_workers=0", "train.num_workers"),
    ("optim.lr=0", "optim.lr: must be above 0"),
    ("loss.temperature=-0.1", "loss.temperature"),
    ("data.seq_len=1", "data.seq_len"),
])
def test_bad_key_or_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, None, [override])
    assert key in str(err.value)


def test_an_empty_experiment_grid_or_no_seeds_is_refused():
    with pytest.raises(ConfigError, match="temperatures: must name at least one value"):
        load_config(SweepConfig, None, ["temperatures=[]"])
    with pytest.raises(ConfigError, match=r"temperatures: .*each once \(got \[0.05, 0.05\]\)"):
        load_config(SweepConfig, None, ["temperatures=[0.05, 0.050]"])
    for grid in ("[]", "[true, true]"):  # the grid's third axis: no trial, or two trials under one name
        with pytest.raises(ConfigError, match="rank_reduction: must name at least one value, each once"):
            load_config(SweepConfig, None, [f"rank_reduction={grid}"])
    with pytest.raises(ConfigError, match="seeds: must be at least 1, got 0"):
        load_config(AblationConfig, None, ["seeds=0"])
    with pytest.raises(ConfigError, match="max_items: must be at least 1"):
        load_config(EvalConfig, None, ["max_items=-3"])
    with pytest.raises(ConfigError, match="max_batch_size: must be at least 1, got 0"):
        load_config(ServeConfig, None, ["max_batch_size=0"])
    with pytest.raises(ConfigError, match="keep_freed_heap_mb: must be at least 0, got -1"):
        load_config(ServeConfig, None, ["keep_freed_heap_mb=-1"])


def test_bad_yaml_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'tokenizer.vocab'"):
        load_config(PipelineConfig, _write(tmp_path, {"tokenizer": {"vocab": 10}}))
    with pytest.raises(ConfigError, match="not found"):
        load_config(PipelineConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(PipelineConfig, None, ["no-equals-sign"])


def test_a_dotted_override_of_one_mapping_key_keeps_the_others(tmp_path):
    """`supervised.task_weights.clr=0.5` changes one weight, whether the YAML lists the mapping or leaves it to the
    default (it replaced the default mapping: the other tasks then trained at weight 0)."""
    default = JobConfig().supervised
    cfg = load_config(JobConfig, None, ["supervised.task_weights.clr=0.5", "supervised.batch_sizes.retrieval=8"])
    assert cfg.supervised.task_weights == {**default.task_weights, "clr": 0.5}
    assert cfg.supervised.batch_sizes == {**default.batch_sizes, "retrieval": 8}
    path = _write(tmp_path, {"supervised": {"task_weights": {"retrieval": 3.0, "sts": 0.5}}})
    assert load_config(JobConfig, path, ["supervised.task_weights.sts=1.0"]).supervised.task_weights == \
        {"retrieval": 3.0, "sts": 1.0}  # the YAML's mapping is the one overridden


def test_invalid_yaml_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="'data.paths=\\[a': its value is not valid YAML"):
        load_config(JobConfig, None, ["data.paths=[a"])
    (tmp_path / "bad.yaml").write_text("train: {steps: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(JobConfig, tmp_path / "bad.yaml")


def test_shipped_configs_load():
    from pathlib import Path
    configs = sorted(Path(__file__).resolve().parents[1].glob("jobs/configs/*.yaml"))
    assert configs
    for path in configs:
        kind = path.name.split("_")[0]
        cls = {"pipeline": PipelineConfig, "serve": ServeConfig, "eval": EvalConfig, "curate": CurationConfig,
               "clr": CLRConfig, "sweep": SweepConfig, "ablation": AblationConfig}.get(kind, JobConfig)
        cfg = load_config(cls, path)
        if isinstance(cfg, (SweepConfig, AblationConfig)):  # the stage configs they name take their overrides
            for stage_yaml in (cfg.weak, getattr(cfg, "supervised", cfg.weak)):
                load_config(JobConfig, stage_yaml, cfg.overrides + getattr(cfg, "dhnm_overrides", []))
            load_config(EvalConfig, cfg.evaluation)


def test_grafana_dashboard_queries_metrics_the_code_exports():
    """Every metric a panel of cluster/grafana_conan.json queries is one Conan defines (Ray metrics or the server's)."""
    import json
    import re
    from pathlib import Path

    from conan.metrics import TRAIN_GAUGES

    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "cluster" / "grafana_conan.json").read_text())
    exported = {f"ray_conan_train_{k}" for k in TRAIN_GAUGES}
    for path in ("conan/dhnm.py", "conan/serve/app.py", "conan/metrics.py"):
        names = re.findall(r'"(conan_[a-z_]+)"', (root / path).read_text())
        names += [f"conan_dhnm_{k}" for k in re.findall(r'for key in \(([^)]*)\)', (root / path).read_text())
                  for k in re.findall(r'"(\w+)"', k)]
        exported |= {n if path.endswith("app.py") else f"ray_{n}" for n in names}
    exported |= {f"{n}_total" for n in exported} | {f"{n}_bucket" for n in exported}
    queried = {m for p in dashboard["panels"] for t in p["targets"]
               for m in re.findall(r"\b(?:ray_)?conan_[a-z_]+", t["expr"])}
    assert queried and queried <= exported, queried - exported
    assert {"ray_conan_train_loss", "ray_conan_train_alpha", "ray_conan_dhnm_replacements", "ray_conan_data_rows_total",
            "ray_conan_translation_failures_total"} <= queried


def test_cluster_manifests_match_job_configs():
    """The GPU autoscaler YAML and the KubeRay Ascend manifests parse, offer enough accelerators for every 1.4b stage's
    workers (64 for pretraining, 16 after it: Appendix A), and every RayJob runs an existing job script with its config."""
    import json
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    gpu = yaml.safe_load((root / "cluster" / "ray-gpu-autoscaler.yaml").read_text())
    worker = gpu["available_node_types"]["gpu_worker"]
    gpu_capacity = worker["resources"]["GPU"] * worker["max_workers"]
    assert worker["max_workers"] <= gpu["max_workers"]
    assert any("--metrics-export-port" in c for c in gpu["head_start_ray_commands"])

    cluster = yaml.safe_load((root / "cluster" / "kuberay" / "raycluster-ascend.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    group = cluster["spec"]["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    npus_per_node = container["resources"]["limits"]["huawei.com/Ascend910"]
    # KubeRay passes the value to `ray start --resources` as a quoted JSON string
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {"NPU": npus_per_node}
    assert {"HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT"} <= {e["name"] for e in container["env"]}
    npu_capacity = npus_per_node * group["maxReplicas"]

    jobs = [d for d in yaml.safe_load_all((root / "cluster" / "kuberay" / "rayjob-stages.yaml").read_text()) if d]
    assert [j["metadata"]["name"] for j in jobs] == [f"conan-{s}" for s in ("pretrain", "sft", "weak", "supervised")]
    for job in jobs:
        assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == \
            cluster["metadata"]["name"]
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "python" and (root / argv[1]).is_file()
        config_path = argv[argv.index("--config") + 1]
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = load_config(JobConfig, root / config_path, overrides)
        assert argv[1] == f"jobs/{cfg.stage}.py" and cfg.train.device == "npu" and cpus_fit(cfg, container)
        expected = 64 if cfg.stage == "pretrain" else 16
        assert cfg.train.num_workers == expected <= min(npu_capacity, gpu_capacity)


def cpus_fit(cfg, container) -> bool:
    """A node's CPUs hold the workers its NPUs host (cpus_per_worker each)."""
    npus = container["resources"]["limits"]["huawei.com/Ascend910"]
    return cfg.train.cpus_per_worker * npus <= float(container["resources"]["limits"]["cpu"])


def test_bundled_data_is_an_identical_copy_of_shippable_sets(data_root, monkeypatch):
    """Only sets the data README marks shippable are bundled, each file byte-identical to the original, each set named
    with its source and licence in ATTRIBUTION.md; without $CONAN_DATA_ROOT the bundle is the default data root."""
    from conan.config import BUNDLED_DATA, default_data_root

    files = [p for p in BUNDLED_DATA.rglob("*") if p.is_file() and p.name != "ATTRIBUTION.md"]
    sets = {p.relative_to(BUNDLED_DATA).parts[0] for p in files}
    assert sets == {"tatoeba", "xquad", "stsb_multi_mt", "csl_zh", "banking77", "text2vec_zh"}
    for path in files:
        assert path.read_bytes() == (data_root / path.relative_to(BUNDLED_DATA)).read_bytes(), path
    assert not any("SOHU" in str(p) for p in files)  # text2vec_zh ships, its SOHU part has no licence
    attribution = (BUNDLED_DATA / "ATTRIBUTION.md").read_text()
    assert all(f"| `{name}/` |" in attribution for name in sets)
    monkeypatch.delenv("CONAN_DATA_ROOT", raising=False)
    assert default_data_root() == str(BUNDLED_DATA)


def test_every_path_of_a_stage_config_is_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    """Tune trials and Ray workers run in their own working directories: a relative path left in the config (the
    ablation's `supervised.clr_paths=[runs/…]` once was) is not found there."""
    from pathlib import Path

    from conan.train.launcher import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(JobConfig, None, [
        "output_dir=out", "model.init_from=m", "tokenizer.path=t", "data.root=d", "data.paths=[a, b]",
        "supervised.clr_paths=[clr]", "dhnm.candidates=c.parquet", "dhnm.passages=p.parquet"]))
    paths = [cfg.output_dir, cfg.model.init_from, cfg.tokenizer.path, cfg.data.root, *cfg.data.paths,
             *cfg.supervised.clr_paths, cfg.dhnm.candidates, cfg.dhnm.passages]
    assert len(paths) == 9 and all(Path(p).is_absolute() and Path(p).parent == tmp_path.resolve() for p in paths)


def test_each_commands_help_shows_an_override_its_config_takes():
    """`conan <command> --help` gives a --set example; each is a key of that command's config (every command
    showed optim.lr, which only the stage configs have)."""
    from conan.cli import SET_EXAMPLES

    configs = {"pipeline": PipelineConfig, "curate": CurationConfig, "clr": CLRConfig, "sweep": SweepConfig,
               "ablation": AblationConfig, "serve": ServeConfig, "evaluate": EvalConfig}
    assert set(SET_EXAMPLES) == set(configs)
    for command, cls in configs.items():
        load_config(cls, None, [SET_EXAMPLES[command]])
    load_config(JobConfig, None, ["optim.lr=2e-5"])  # the stage commands' example


def test_the_pipelines_activation_checkpointing_reaches_every_stage():
    """It was accepted and ignored: every stage trained without it. A stage override still has the last word."""
    from conan.pipeline import stage_overrides

    cfg = load_config(PipelineConfig, "jobs/configs/pipeline_tiny.yaml", ["model.activation_checkpointing=true"])
    assert all(load_config(JobConfig, s, stage_overrides(cfg)).model.activation_checkpointing for s in cfg.stages)
    cfg.stage_overrides = ["model.activation_checkpointing=false"]
    assert not any(load_config(JobConfig, s, stage_overrides(cfg)).model.activation_checkpointing for s in cfg.stages)
    plain = load_config(PipelineConfig, "jobs/configs/pipeline_tiny.yaml")
    assert not any(load_config(JobConfig, s, stage_overrides(plain)).model.activation_checkpointing for s in plain.stages)
