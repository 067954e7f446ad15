"""The `conan` console script: one subcommand per platform task, each with its own --help."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from conan.config import PIPELINE_STEPS, STAGES, USER_ERRORS, ConfigError, PipelineConfig, load_config


# An override each command's config does have, for its --help.
SET_EXAMPLES = {"pipeline": "stage_overrides=[train.num_workers=4]", "curate": "languages=[en, zh]",
                "clr": "backend=hf", "sweep": "temperatures=[0.02, 0.05]", "ablation": "seeds=5",
                "serve": "port=9000", "evaluate": "max_items=200"}


def _config_command(sub, name: str, func, what: str, logs: bool = True, **texts) -> argparse.ArgumentParser:
    """A subcommand reading a typed config: --config YAML and repeatable --set overrides; `logs`: it runs Ray and
    keeps the internals' output in <output_dir>/logs (--verbose prints it instead)."""
    parser = sub.add_parser(name, **texts)
    parser.set_defaults(func=func)
    parser.add_argument("--config", help=f"YAML file of the {what} (defaults apply when omitted)")
    example = SET_EXAMPLES.get(name, "optim.lr=2e-5 (a mapping's key, e.g. supervised.task_weights.sts=1.0, keeps "
                                      "its other keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config value by dotted key, e.g. --set {example}; repeatable")
    if logs:
        parser.add_argument("--verbose", action="store_true",
                            help="print Ray's, DeepSpeed's and the workers' own output here instead of to "
                                 "<output_dir>/logs/<command>.log")
    return parser


def _quiet(args, output_dir: str):
    """The command's console: its own lines here, the internals in <output_dir>/logs/<command>.log (unless
    --verbose)."""
    from conan.console import log_file, quiet

    return quiet(log_file(output_dir, args.command), args.verbose)


def cmd_pipeline(args) -> int:
    """Run the end-to-end pipeline."""
    from conan.pipeline import check_step_configs, run_pipeline

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    if args.from_step:
        from conan.pipeline import reset_from
        check_step_configs(cfg)  # a mistake in a config must not cost the outputs --from removes
        for path in reset_from(cfg.output_dir, args.from_step):
            print(f"[pipeline] --from {args.from_step}: removed {path}", flush=True)
    start = time.perf_counter()
    with _quiet(args, cfg.output_dir):
        paths = run_pipeline(cfg)
    print(json.dumps(paths, indent=2))
    print(f"[pipeline] done in {time.perf_counter() - start:.0f}s\n  model:  {paths['model']}"
          + (f"\n  report: {paths['report']}\n  plots:  {', '.join(paths['plots'])}" if "report" in paths else ""),
          flush=True)
    return 0


def stage_config(args, stage: str):
    """The command's JobConfig for `stage`: a config file that names another stage is a mistake, not an override (one
    that names none takes the command's)."""
    import yaml

    from conan.config import JobConfig

    cfg = load_config(JobConfig, args.config, [*args.overrides, f"stage={stage}"])  # its own errors first
    named = (yaml.safe_load(Path(args.config).read_text()) or {}).get("stage") if args.config else None
    if named is not None and named != stage:
        raise ConfigError(f"stage: {args.config} configures stage {named!r}, not {stage!r}")
    return cfg


def cmd_train(args) -> int:
    """Train one stage on Ray Train."""
    from conan.train.launcher import run_stage

    cfg = stage_config(args, args.stage)
    with _quiet(args, cfg.output_dir):
        result = run_stage(cfg)
    print(json.dumps({"stage": cfg.stage, "model": str(result.model_dir), "skipped": result.skipped,
                      "metrics": result.metrics}, indent=2))
    return 0


def cmd_shard(args) -> int:
    """Write a stage's input as shards (what `conan train` would do first), without training."""
    from conan.runtime import init_ray
    from conan.train.launcher import absolute_paths, check_inputs, stage_shards, with_demo_data
    from conan.train.stages import stage_class

    cfg = absolute_paths(stage_config(args, args.stage))
    tokenizer_dir = check_inputs(cfg)  # what `conan train` checks first; the upstream tokenization needs it
    with _quiet(args, cfg.output_dir):
        init_ray(cfg.ray_address)
        stage = stage_class(args.stage)
        shards = stage_shards(with_demo_data(cfg, stage), stage, tokenizer_dir)
    print(json.dumps({"shards": shards}))
    return 0


def cmd_demo(args) -> int:
    """Write a stage's input from the demo data source (the bundled datasets), as `conan train` does when
    data.paths is empty."""
    from conan.train.launcher import absolute_paths, with_demo_data
    from conan.train.stages import stage_class

    cfg = absolute_paths(stage_config(args, args.stage))
    if cfg.data.paths:
        raise ConfigError(f"data.paths is set ({cfg.data.paths}): the stage reads that, not the demo data")
    cfg = with_demo_data(cfg, stage_class(args.stage))
    print(json.dumps({"records": cfg.data.paths[0], "passages": cfg.dhnm.passages}))
    return 0


def cmd_mine(args) -> int:
    """Mine hard-negative candidates for the supervised stage's queries."""
    from conan.runtime import init_ray
    from conan.train.launcher import absolute_paths, check_inputs, mine_negatives, with_demo_data
    from conan.train.stages import stage_class

    cfg = absolute_paths(stage_config(args, "supervised"))
    check_inputs(cfg)
    with _quiet(args, cfg.output_dir):
        init_ray(cfg.ray_address)
        cfg = with_demo_data(cfg, stage_class("supervised"))
        path = mine_negatives(cfg, force=True)
    print(json.dumps({"candidates": str(path)}))
    return 0


def cmd_curate(args) -> int:
    """Curate weak pairs: clean, filter, deduplicate, score."""
    from conan.config import CurationConfig
    from conan.data.weak import curate

    cfg = load_config(CurationConfig, args.config, args.overrides)
    with _quiet(args, cfg.output_dir):
        stats = curate(cfg)
    print(json.dumps({k: stats[k] for k in ("rows_in", "rows_out", "rejected", "seconds")} |
                     {"pairs": f"{cfg.output_dir}/data", "rejects": f"{cfg.output_dir}/rejects",
                      "stats": f"{cfg.output_dir}/stats.json"}, indent=2))
    return 0


def cmd_clr(args) -> int:
    """Build the cross-lingual retrieval set."""
    from conan.config import CLRConfig
    from conan.data.clr import build_clr

    cfg = load_config(CLRConfig, args.config, args.overrides)
    with _quiet(args, cfg.output_dir):
        stats = build_clr(cfg)
    print(json.dumps({k: stats[k] for k in ("rows_in", "rows_out", "rejected", "languages", "seconds")} |
                     {"clr": f"{cfg.output_dir}/data", "rejects": f"{cfg.output_dir}/rejects",
                      "stats": f"{cfg.output_dir}/stats.json"}, indent=2))
    return 0


def _experiment(config_cls, run, args) -> int:
    """Run a Ray Tune experiment from its config and print its results table."""
    cfg = load_config(config_cls, args.config, args.overrides)
    with _quiet(args, cfg.output_dir):
        path = run(cfg)
    print(path.read_text())
    print(f"results: {path}")
    return 0


def cmd_sweep(args) -> int:
    """Sweep the soft-mask schedule on Ray Tune."""
    from conan.config import SweepConfig
    from conan.experiments.sweep_mask import run_sweep

    return _experiment(SweepConfig, run_sweep, args)


def cmd_ablation(args) -> int:
    """Run the Table 4 ablation on Ray Tune."""
    from conan.config import AblationConfig
    from conan.experiments.ablation import run_ablation

    return _experiment(AblationConfig, run_ablation, args)


def cmd_serve(args) -> int:
    """Serve an exported embedding model over OpenAI-compatible HTTP."""
    from conan.config import ServeConfig
    from conan.serve.runner import run_ray_serve, run_uvicorn

    cfg = load_config(ServeConfig, args.config, args.overrides)
    (run_ray_serve if cfg.backend == "ray" else run_uvicorn)(cfg)
    return 0


def cmd_export(args) -> int:
    """Add sentence-transformers files to an exported embedding model, or write the model as Llama."""
    from conan.encoder import check_model_dir
    from conan.export import add_sentence_transformers_files, export_llama

    if args.format == "llama" and not args.out:
        raise ConfigError("conan export --format llama needs --out DIR")
    if args.format != "llama" and args.out:  # it wrote into MODEL_DIR and left --out uncreated
        raise ConfigError("conan export: --out is for --format llama; the sentence-transformers files go into "
                          "MODEL_DIR itself (copy the directory first to keep the original untouched)")
    check_model_dir(args.model_dir)
    if args.format == "llama":
        print(export_llama(args.model_dir, args.out))
    else:
        print(add_sentence_transformers_files(args.model_dir))
    return 0


def cmd_evaluate(args) -> int:
    """Evaluate an exported embedding model on local data and write scores.json + report.md."""
    from conan.config import EvalConfig
    from conan.eval.runner import evaluate

    cfg = load_config(EvalConfig, args.config, args.overrides)
    evaluate(cfg)
    print(json.dumps({"scores": f"{cfg.output_dir}/scores.json", "report": f"{cfg.output_dir}/report.md"}))
    return 0


def cmd_corpus(args) -> int:
    """Write the multilingual text corpus."""
    from conan.config import default_data_root
    from conan.data.corpus import write_corpus

    rows = write_corpus(args.data_root or default_data_root(), args.out, args.sources, args.max_per_source)
    print(f"{rows} texts → {args.out}")
    return 0


def cmd_tokenizer(args) -> int:
    """Train a byte-level BPE tokenizer."""
    from conan.config import require_paths
    from conan.runtime import init_ray
    from conan.tokenizer import check_vocab_size, train_tokenizer

    require_paths(args.inputs, "conan tokenizer inputs")
    check_vocab_size(args.vocab_size)
    init_ray(args.ray_address)
    tok = train_tokenizer(args.inputs, args.out, args.vocab_size, args.min_frequency, args.max_texts)
    print(f"tokenizer with {len(tok)} tokens → {args.out}")
    return 0


def cmd_model_info(args) -> int:
    """Print parameter counts of the model presets."""
    from conan.model import PRESETS, count_parameters
    from conan.model.build import preset_config

    for name in args.preset or sorted(PRESETS):
        config = preset_config(name)
        print(f"{name}: {count_parameters(config):,} parameters (hidden {config.hidden_size}, "
              f"layers {config.num_hidden_layers}, heads {config.num_attention_heads}/"
              f"{config.num_key_value_heads} KV, FFN {config.intermediate_size}, vocab {config.vocab_size})")
    return 0


def _as_script(parser: argparse.ArgumentParser, script: str, command: str) -> None:
    """Present `command`'s parser as the job script's: its usage names the script and hides the positional
    arguments (the stage) that the script passes itself."""
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subcommands.choices[command]
    sub.prog = f"python {script}"
    for action in sub._actions:
        if not action.option_strings:
            action.help = argparse.SUPPRESS
    parser.prog, parser.usage = sub.prog, sub.format_usage().removeprefix("usage: ").strip()  # unknown arguments


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `conan` command."""
    parser = argparse.ArgumentParser(prog="conan", description=__doc__.splitlines()[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _config_command(sub, "pipeline", cmd_pipeline, "pipeline (PipelineConfig)",
                        help="run the end-to-end pipeline (the README's main job)",
                        description="Corpus → tokenizer → model → pretrain → sft → curate → weak → clr → mine → "
                                    "supervised → evaluate on real data; finished steps are skipped, and a finished step "
                                    "whose settings have changed since is refused (redo it with --from).")
    p.add_argument("--from", dest="from_step", choices=list(PIPELINE_STEPS), metavar="STEP",
                   help=f"redo STEP and every later one (their outputs are removed first): {', '.join(PIPELINE_STEPS)}")

    p = _config_command(sub, "train", cmd_train, "stage (JobConfig)",
                        help="train one stage (pretrain, sft, weak, supervised) on Ray Train + DeepSpeed",
                        description="Run a stage on Ray Train workers with DeepSpeed ZeRO; resumes from its latest "
                                    "checkpoint and exports a Hugging Face model to <output_dir>/model.")
    p.add_argument("stage", choices=list(STAGES), help="which stage")

    p = _config_command(sub, "shard", cmd_shard, "stage (JobConfig)",
                        help="write a stage's input (data.paths) as parquet shards with a manifest, without training",
                        description="Stream data.paths (parquet / JSONL / .jsonl.gz files or directories) into "
                                    "shards grouped by the stage's batch columns, one Ray task per input file, under "
                                    "<output_dir>/shards; a row the stage cannot train on goes, with its reason and "
                                    "line, to the shard directory's rejects/ and is counted. Then tokenize upstream on "
                                    "a Ray Data actor pool (in process below 250,000 rows) (pretraining: token blocks; "
                                    "the other stages: their texts' token ids). `conan train` does the same first and "
                                    "reuses them; like it, this needs the tokenizer (tokenizer.path or "
                                    "model.init_from).")
    p.add_argument("stage", choices=list(STAGES), help="which stage")

    p = _config_command(sub, "demo", cmd_demo, "stage (JobConfig)", logs=False,
                        help="write a stage's input from the demo data source (the bundled datasets)",
                        description="Write the rows of the stage's input kind (documents, instructions, pairs, "
                                    "tasks) built from the bundled (or $CONAN_DATA_ROOT) datasets to "
                                    "<output_dir>/demo/<kind>-<digest>/records.parquet (one folder per kind and "
                                    "setting) and, for the supervised stage, the passage "
                                    "corpus DHNM indexes to passages.parquet. `conan train` does this itself when "
                                    "data.paths is empty; point data.paths (and dhnm.passages) at your own files "
                                    "instead.")
    p.add_argument("stage", choices=list(STAGES), help="which stage")

    _config_command(sub, "mine", cmd_mine,
                    "supervised stage (JobConfig; dhnm.pool_size, dhnm.false_negative_ratio, dhnm.mining.*)",
                    help="mine hard-negative candidates (faiss) for the supervised stage's DHNM pool",
                    description="Embed the supervised stage's queries and the passage corpus with model.init_from "
                                "(in this process when small: dhnm.mining.in_process_work; else on a Ray Data "
                                "actor pool), search a faiss index, drop positives, apply the "
                                "false-negative guard and write parquet (query_id, candidate_ids, "
                                "candidate_scores) to dhnm.candidates or <output_dir>/mined_negatives.parquet.")

    _config_command(sub, "curate", cmd_curate, "curation (CurationConfig)",
                    help="curate weak pairs on Ray Data: normalise, rule filters, language id, exact + MinHash "
                         "dedup, quality score >= min_score",
                    description="Stream JSONL / parquet pairs or SFT records (input → query, output → "
                                "positive) through Ray Data; write parquet pairs to <output_dir>/data, every "
                                "rejected row with its reason to <output_dir>/rejects, counts to stats.json.")

    _config_command(sub, "clr", cmd_clr, "CLR build (CLRConfig)",
                    help="build the cross-lingual retrieval set: translate queries into Table 7's languages",
                    description="Draw a target language per query with the paper's Table 7 proportions (seeded), "
                                "translate the query only (backend lookup | hf | vllm), clean and retry, and write "
                                "CLR triples (query_lang, doc_lang) to <output_dir>/data, rejects and stats.json.")

    _config_command(sub, "sweep", cmd_sweep, "sweep (SweepConfig)",
                    help="sweep the soft-mask schedule, rank reduction and temperature on Ray Tune (Table 12)",
                    description="One Tune trial per schedule × rank reduction × temperature: a short weak-stage "
                                "TorchTrainer run (TuneReportCallback) scored by a quick dev evaluation; writes "
                                "<output_dir>/results.md beside the paper's Table 12.")

    _config_command(sub, "ablation", cmd_ablation, "ablation (AblationConfig)",
                    help="the Table 4 ablation on Ray Tune: soft mask, CLR and DHNM toggled",
                    description="Weak stage with each soft-mask schedule and without the soft mask, then the "
                                "paper's six Table 4 rows (SM, CLR, DHNM toggled) and one soft-mask-only row per "
                                "further schedule (Table 12), each run once per seed and scored by a quick dev "
                                "evaluation; writes <output_dir>/results.md with the paper's numbers beside ours.")

    _config_command(sub, "serve", cmd_serve, "server (ServeConfig)", logs=False,
                    help="serve an embedding model: OpenAI-compatible /v1/embeddings (uvicorn or Ray Serve)",
                    description="POST /v1/embeddings (input, model, dimensions, encoding_format), GET /v1/models, "
                                "/health, /metrics; dynamic batching, optional bearer token (api_key_env), "
                                "backend=uvicorn or backend=ray (replicas).")

    _config_command(sub, "evaluate", cmd_evaluate, "evaluation (EvalConfig)", logs=False,
                    help="score a model (each Matryoshka dim), a baseline model and BM25 on local data",
                    description="Retrieval (XQuAD, cross-lingual XQuAD→English, BEIR folders), STS (STS-B multi, "
                                "cross-lingual pairs), classification (Banking77, CSL), bitext mining (Tatoeba); "
                                "writes scores.json, report.md and plots to output_dir.")

    p = sub.add_parser("export", help="make an exported model loadable by sentence-transformers, or write it as Llama",
                       description="sentence-transformers (default): write its module files (Transformer → Pooling "
                                   "→ Normalize) into an embedding model directory; the embedding stages do this on "
                                   "export already. llama: write any stage's model to --out as a stock "
                                   "LlamaForCausalLM directory (transformers, vLLM; no custom code).")
    p.add_argument("model_dir", help="exported Conan model directory")
    p.add_argument("--format", choices=["sentence-transformers", "llama"], default="sentence-transformers")
    p.add_argument("--out", help="output directory (--format llama)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("corpus", help="write the multilingual text corpus from the bundled (or $CONAN_DATA_ROOT) datasets",
                       description="Extract texts (with language and source) from the real datasets into parquet.")
    p.add_argument("--out", required=True, help="output parquet file")
    p.add_argument("--data-root", help="dataset folder (default: $CONAN_DATA_ROOT, else the copies bundled in conan/data/bundled)")
    p.add_argument("--sources", nargs="+", help="subset of sources (tatoeba xquad stsb_multi_mt csl banking77)")
    p.add_argument("--max-per-source", type=int, help="cap on texts per source")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer over a Ray Data stream",
                       description="Train a byte-level BPE on text/parquet/JSONL files and save it as a "
                                   "PreTrainedTokenizerFast directory.")
    p.add_argument("inputs", nargs="+", help="files or folders of .txt, .parquet (column text) or .jsonl")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (150000 for conan-1.4b)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge")
    p.add_argument("--max-texts", type=int, help="cap on training texts")
    p.add_argument("--ray-address", help="Ray cluster address (default: local Ray)")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("model-info", help="print parameter counts of the model presets (no allocation)",
                       description="Count each preset's parameters on the meta device.")
    p.add_argument("--preset", nargs="+", help="presets to show (default: all)")
    p.set_defaults(func=cmd_model_info)
    return parser


def main(argv: list[str] | None = None, script: str | None = None) -> int:
    """Parse arguments and run the chosen subcommand. `script`: the job script (jobs/<name>.py) that gave argv's
    leading command words itself; its --help and errors name it and ask only for the rest."""
    parser = build_parser()
    if script:
        _as_script(parser, script, argv[0])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"conan {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
