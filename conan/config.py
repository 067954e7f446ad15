"""Typed job configuration: dataclasses per section, loaded from YAML with dotted overrides.

    cfg = load_config(JobConfig, "jobs/configs/weak_tiny.yaml", ["optim.lr=2e-5"])

Unknown keys and values of the wrong type raise ConfigError naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

T = TypeVar("T")

Stage = Literal["pretrain", "sft", "weak", "supervised"]
STAGES: tuple[str, ...] = ("pretrain", "sft", "weak", "supervised")


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type."""


# What the user can fix from the message alone: the CLI prints these as one line, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError)


def require_paths(paths: list[str], key: str) -> None:
    """Fail with one line naming `key` and the first local path in `paths` that does not exist (URIs are left to
    their filesystem)."""
    for p in paths:
        if "://" not in str(p) and not Path(p).exists():
            raise ConfigError(f"{key}: {p} does not exist")


BUNDLED_DATA = Path(__file__).resolve().parent / "data" / "bundled"  # the shippable sets, with licences


def default_data_root() -> str:
    """Where the real datasets live: $CONAN_DATA_ROOT, else the copies bundled in the package."""
    return os.environ.get("CONAN_DATA_ROOT", str(BUNDLED_DATA))


@dataclass
class ModelSpec:
    """Which model to build or load."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # ConanConfig fields, e.g. {num_hidden_layers: 4}
    init_from: str | None = None  # exported model directory of the previous stage; None = random init
    # Recompute each decoder layer in the backward pass instead of keeping its activations: a layer's input is all
    # a step keeps of it, for one more forward pass of compute (long sequences on big presets).
    activation_checkpointing: bool = False


@dataclass
class TokenizerConfig:
    """Byte-level BPE training (or the path of an existing tokenizer to reuse)."""

    path: str | None = None  # an existing tokenizer directory; when set, nothing is trained
    vocab_size: int = 8192
    min_frequency: int = 2
    max_texts: int | None = None  # cap on training texts (None = all)


@dataclass
class DataConfig:
    """Where the stage's input lives."""

    LEAST: ClassVar[dict[str, int]] = {"seq_len": 2, "shuffle_window": 1, "max_rows": 1}

    root: str = field(default_factory=default_data_root)
    paths: list[str] = field(default_factory=list)  # stage inputs: parquet / JSON-lines (.gz too) files or dirs
    max_rows: int | None = None  # a seeded random sample of this many rows (None = all)
    seq_len: int = 128
    # Columns every global micro-batch shares (the weak stage: [source, lang], so in-batch negatives are not told
    # apart by their language alone); [] = mixed batches; None = the stage's default.
    batch_by: list[str] | None = None
    # Rows of a worker's share of a group permuted together, so a batch mixes the files they span; a worker holds the
    # row groups of one window per group. Raise it for input sorted by topic: memory grows with it, not with the data.
    shuffle_window: int = 50_000
    # MiB of shard row groups a worker holds over all its groups: each group's window is cut to its share (less one
    # row group, never under one) when the groups are many (a line says so at the start), so memory does not grow
    # with their number.
    reader_memory_mb: int = 2048
    # Micro-batches cut together from rows sorted by token length (ShardStream: same rows per epoch, far fewer pad
    # tokens; negatives still come from the whole window), e.g. 16; 0 or 1: off. Off by default: the weak stage
    # trains 1.3x faster with it (bench/weak_throughput), but on the demo it moved the supervised-over-weak margins
    # (~0.01) across zero.
    bucket_batches: int = 0
    # The embedding stages' texts of each forward pass (weak queries and passages, supervised queries, passages, STS
    # pairs) packed into one unpadded row (attention per text, grouped by like lengths; the soft mask's l is the
    # pass's longest text, as when padded) instead of padded to the longest: the same embeddings to float rounding,
    # without the padding's compute (a Banking77 batch is ~75 % padding, a weak batch's queries ~50 %). The demo's
    # weak and supervised configs set it; off by default until measured on GPUs, where each group of like lengths is
    # one more kernel launch.
    pack_texts: bool = False


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay (paper App. A defaults)."""

    ABOVE: ClassVar[dict[str, float]] = {"lr": 0.0}

    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1


@dataclass
class SoftMaskConfig:
    """Soft-mask schedule of the weak stage (eq. 3-4, App. C)."""

    enabled: bool = True
    schedule: Literal["linear", "accelerating", "decelerating"] = "linear"
    rank_reduction: bool = True


@dataclass
class LossConfig:
    """Contrastive loss settings."""

    ABOVE: ClassVar[dict[str, float]] = {"temperature": 0.0}

    temperature: float = 0.05
    cosent_scale: float = 20.0
    matryoshka_dims: list[int] | None = None  # None = the model config's matryoshka_dims


@dataclass
class SupervisedConfig:
    """Task mixture of the supervised stage (App. A: batch 4 for retrieval, 32 for STS per worker)."""

    LEAST: ClassVar[dict[str, int]] = {"num_negatives": 0, "max_per_task": 1}

    num_negatives: int = 7
    batch_sizes: dict[str, int] = field(default_factory=lambda: {
        "retrieval": 4, "clr": 4, "classification": 4, "sts": 32})
    task_weights: dict[str, float] = field(default_factory=lambda: {
        "retrieval": 1.0, "clr": 1.0, "classification": 1.0, "sts": 1.0})
    max_per_task: int | None = None
    retrieval_langs: list[str] | None = None  # XQuAD / zh languages of the built-in retrieval rows (None = all)
    # a CLR set (conan clr): it replaces the demo's CLR rows, or joins the user's data.paths
    clr_paths: list[str] = field(default_factory=list)


@dataclass
class ActorPoolConfig:
    """Resources of one Ray Data actor pool: fractional CPUs on small machines (2 CPUs starve otherwise), GPUs on
    clusters."""

    size: int = 1
    cpus: float = 0.5
    gpus: float = 0.0
    batch_size: int = 64


@dataclass
class MiningConfig:
    """How mining embeds the passage corpus and the queries and searches them (jobs/mine_negatives.py); memory is
    bounded by byte budgets, whatever the corpus and query counts."""

    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"  # faiss index (auto: exact below ivf_threshold passages)
    ivf_threshold: int = 100_000
    # Matryoshka prefix mining embeds and searches at (None = the model's full width): at the 1.4B's 3584 a 256-dim
    # prefix makes the search 14× cheaper and the embedding shards 14× smaller.
    dim: int | None = None
    max_length: int = 256  # tokens a passage or query is embedded with
    # The embedding pool: one GPU an actor on a cluster.
    actors: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    # texts × max_length × model bytes up to which the launching process embeds them itself: an actor pool's start-up
    # (~7 s) outweighs the work (the tiny demo's 2,000 queries at 5 MB of weights: about 3e12, 1 s).
    in_process_work: float = 1e13
    shard_bytes: int = 256 << 20  # an embedding shard's float32 bytes: the search holds one shard (and its index)
    query_chunk_bytes: int = 1 << 30  # the query embeddings embedded and searched at a time
    query_batch: int = 8192  # queries searched at once: bounds the score and merge buffers
    # Query chunks searched at once, each a Ray task of search_cpus (faiss's threads) on any node, while the launching
    # process embeds the next chunk; shard indexes are built first, one Ray task a shard. The embedding shards (and
    # output_dir) must be on storage every node sees. Without Ray, all of it runs in the launching process.
    search_tasks: int = 2
    search_cpus: float = 1.0


@dataclass
class DHNMConfig:
    """Dynamic hard-negative mining of the supervised stage (§3.4, eq. 6); thresholds default to the paper's."""

    LEAST: ClassVar[dict[str, int]] = {"pool_size": 1, "num_shards": 1}

    enabled: bool = False
    candidates: str | None = None  # mined parquet (jobs/mine_negatives.py); None = mine with model.init_from first
    # The passage corpus (parquet, column text) that rows' positive_id and the candidates' ids index; with data.paths
    # empty, the demo data source's.
    passages: str | None = None
    pool_size: int = 30  # candidates per query
    false_negative_ratio: float = 0.95
    mining: MiningConfig = field(default_factory=MiningConfig)
    num_shards: int = 1
    # Ray resources each pool shard asks for, e.g. {memory: 3e9} or a custom resource that places the shards on CPU
    # nodes with room for their arrays; {} = anywhere (they take no CPU).
    pool_resources: dict[str, float] = field(default_factory=dict)
    first_sight_min: float = 0.4
    decay_factor: float = 1.2
    stale_max: float = 0.7
    # 0 = scores come from the loss (no extra forward pass). K > 0 = the v1 baseline, for comparison: every K steps
    # an extra no-grad forward pass re-scores every managed query's active negatives.
    rescore_every: int = 0


@dataclass
class TrainConfig:
    """Loop, parallelism and checkpointing."""

    LEAST: ClassVar[dict[str, int]] = {"steps": 1, "micro_batch_size": 1, "grad_accum": 1, "num_workers": 1,
                                       "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 1,
                                       "max_failures": 0}
    ABOVE: ClassVar[dict[str, float]] = {"cpus_per_worker": 0.0}

    steps: int = 50
    micro_batch_size: int = 8
    grad_accum: int = 1
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    zero_stage: int = 1
    log_every: int = 5
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    max_failures: int = 1
    seed: int = 0
    inject_failure_at_step: int | None = None  # chaos test: raise once at this step, to exercise resume
    log_row_ids: bool = False  # append (step, rank, row ids) of every micro-batch to <output_dir>/row_ids/rank<r>.jsonl


@dataclass
class ServeConfig:
    """The OpenAI-compatible embeddings server (`conan serve`)."""

    # max_batch_size 0 planned passes of no text, so no request was ever answered; a negative heap size reached malloc.
    LEAST: ClassVar[dict[str, int]] = {"max_batch_size": 1, "forward_tokens": 1, "keep_freed_heap_mb": 0}
    model_dir: str = "runs/tiny/supervised/model"
    # The `model` clients send and /v1/models lists; default: the directory's name (its parent's for …/model).
    model_name: str | None = None
    host: str = "127.0.0.1"  # loopback only unless told otherwise (0.0.0.0: every interface)
    port: int = 8080
    api_key_env: str | None = None  # name of the environment variable holding the bearer token; None = no auth
    device: str = "cpu"
    # Dynamic batching: each forward pass takes the oldest waiting texts (of any request) in arrival order, at most
    # max_batch_size texts and forward_tokens tokens, packed into one unpadded row, attention per group of like
    # lengths. On CPU (small-20m, 1 thread) 1,024 tokens a pass ran 20 % faster than 256 (before the grouping,
    # 256 was the best: one group padded every text to the pass's longest); on a GPU raise both (e.g. 256 and 16384).
    max_batch_size: int = 64
    forward_tokens: int = 1024
    max_wait_ms: float = 0.0  # when idle, wait this long for more requests before the first pass (0: none)
    max_inputs_per_request: int = 512
    max_input_tokens: int | None = None  # longer inputs are refused (400); None = the model's context
    max_request_bytes: int = 4 * 1024 * 1024  # larger bodies are refused (413) before or while they are read
    max_queued_texts: int = 2048  # texts submitted, not yet embedded; past it requests get 429 + Retry-After
    # Freed memory the serving process keeps for reuse on CPU (glibc malloc; conan.heap) instead of returning it to
    # the OS after every forward pass and faulting it back in on the next: 0 leaves glibc's defaults.
    keep_freed_heap_mb: int = 64
    drain_timeout_s: int = 30  # on SIGTERM / Ctrl-C, requests in flight get this long to finish
    access_log: bool = False  # a log line per request costs the event loop ~0.1 ms; /metrics counts requests
    backend: Literal["uvicorn", "ray"] = "uvicorn"
    ray_address: str | None = None
    replicas: int = 1  # Ray Serve replicas (backend: ray)
    replica_cpus: float = 1.0


@dataclass
class JobConfig:
    """One stage's whole configuration."""

    stage: Stage = "pretrain"
    name: str = "conan"
    output_dir: str = "runs/tiny"
    ray_address: str | None = None  # None = start or join a local Ray
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    soft_mask: SoftMaskConfig = field(default_factory=SoftMaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    dhnm: DHNMConfig = field(default_factory=DHNMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The pipeline's steps in run order, each with the folder under output_dir that holds its output (here, not in
# conan.pipeline, so that `conan --help` lists them without importing the training stack).
PIPELINE_STEPS = {"corpus": "corpus", "tokenizer": "tokenizer", "model": "model_init", "pretrain": "pretrain",
                  "sft": "sft", "curate": "curated", "weak": "weak", "clr": "clr", "mine": "mined",
                  "supervised": "supervised", "evaluate": "eval"}


@dataclass
class PipelineConfig:
    """The end-to-end pipeline: corpus → tokenizer → model, then the stage configs in order."""

    output_dir: str = "runs/pipeline"
    data_root: str = field(default_factory=default_data_root)
    seed: int = 0  # of the initial model's weights (the stages have their own train.seed)
    corpus_sources: list[str] | None = None  # None = every source in conan.data.corpus
    corpus_max_per_source: int | None = None
    ray_address: str | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # The initial model: preset and overrides; activation_checkpointing on turns it on in every stage; init_from is a
    # stage's setting (conan train), an error here.
    model: ModelSpec = field(default_factory=ModelSpec)
    # Stage YAMLs run in order after the model is built; each starts from the previous export and
    # writes under output_dir/<stage>. Overrides apply to every stage (e.g. train.steps=10).
    stages: list[str] = field(default_factory=list)
    stage_overrides: list[str] = field(default_factory=list)
    # A CurationConfig YAML run before the weak stage (which then trains on its pairs) into output_dir/curated, and
    # a CLRConfig YAML run before the supervised stage (its CLR rows) into output_dir/clr; None = skip the step.
    curation: str | None = None
    clr: str | None = None
    # An EvalConfig YAML run on the final model (baselines: the untrained init, the weak model) into output_dir/eval;
    # None = skip.
    evaluation: str | None = None


@dataclass
class ExperimentConfig:
    """Trials on Ray Tune, each one stage run scored by a quick dev evaluation (conan/experiments/trials.py)."""

    output_dir: str = "runs/tiny/experiment"
    data_root: str = field(default_factory=default_data_root)
    ray_address: str | None = None
    weak: str = "jobs/configs/weak_tiny.yaml"  # the weak stage config the trials start from
    overrides: list[str] = field(default_factory=list)  # applied to every trial's stage config (e.g. train.steps=20)
    evaluation: str = "jobs/configs/eval_dev_tiny.yaml"  # the EvalConfig YAML scoring each trial's model
    trial_cpus: float = 0.1  # the Tune function itself; its TorchTrainer's workers ask train.cpus_per_worker each
    max_concurrent: int = 0  # 0 = as many trials at once as the cluster's CPUs fit


@dataclass
class SweepConfig(ExperimentConfig):
    """The soft-mask sweep (jobs/sweep_mask.py): every schedule × rank-reduction × temperature on the weak stage."""

    NOT_EMPTY: ClassVar[tuple[str, ...]] = ("schedules", "rank_reduction", "temperatures")

    schedules: list[Literal["linear", "accelerating", "decelerating"]] = field(
        default_factory=lambda: ["linear", "accelerating", "decelerating"])
    rank_reduction: list[bool] = field(default_factory=lambda: [True, False])
    temperatures: list[float] = field(default_factory=lambda: [0.05])


@dataclass
class AblationConfig(ExperimentConfig):
    """The ablation of Tables 4 and 12 (jobs/ablation.py): the weak stage with each soft-mask schedule and without
    the soft mask, then the supervised stage from each with CLR and DHNM toggled, every row once per seed."""

    NOT_EMPTY: ClassVar[tuple[str, ...]] = ("schedules",)

    LEAST: ClassVar[dict[str, int]] = {"seeds": 1}

    supervised: str = "jobs/configs/supervised_tiny.yaml"
    seeds: int = 3  # runs per row (train.seed 0 … seeds-1): the table shows mean ± std
    schedules: list[Literal["linear", "accelerating", "decelerating"]] = field(
        default_factory=lambda: ["linear", "accelerating", "decelerating"])  # Table 12's rows
    clr_weight: float = 1.0  # the CLR task's weight in the rows with CLR on
    dhnm_overrides: list[str] = field(default_factory=list)  # when DHNM is on (e.g. thresholds for a small model)


@dataclass
class CurationConfig:
    """Weak-pair curation (`jobs/curate_weak.py`): normalise → rule filters → language id → exact + near dedup
    → quality score ≥ min_score; parquet pairs, rejects and stats.json under output_dir."""

    inputs: list[str] = field(default_factory=list)  # JSONL / parquet files or dirs (local or URIs); [] = the SFT
    output_dir: str = "runs/curated"                  # pairs of data_root (XQuAD, CSL, bge, STS-B paraphrases)
    data_root: str = field(default_factory=default_data_root)  # Tatoeba, for the language identifier
    ray_address: str | None = None
    query_chars: list[int] = field(default_factory=lambda: [2, 2048])  # [min, max] after normalisation
    positive_chars: list[int] = field(default_factory=lambda: [5, 16384])
    max_char_run: int = 16  # a character repeated this often in a row marks junk
    languages: list[str] | None = None  # allowed ISO 639-1 codes (None = any the identifier knows)
    lang_top_k: int = 2  # a declared `lang` passes when among the identifier's top-k …
    lang_margin: float = 10.0  # … and within this many nats of the best language's log-likelihood
    blocklist: list[str] = field(default_factory=list)  # case-insensitive words / phrases
    blocklist_file: str | None = None  # one phrase a line, added to blocklist
    near_dedup: bool = True
    minhash_perms: int = 64
    minhash_bands: int = 8
    shingle_bytes: int = 8
    dedup_shards: int = 2
    score_model: str | None = None  # Conan export, sentence-transformers or HF model dir; None = no scoring
    min_score: float = 0.4  # the paper's threshold (gte-Qwen2-7B-instruct cosine)
    # Rows per cleaning batch: each is one block through dedup and one output part; 8,192 rows (~4 MB) keep Ray
    # Data's per-block cost small (1.3x the rows/s of 2,048 at 200k rows, bench/curation.py). Small inputs want
    # smaller batches so every cleaner gets some (curate_tiny.yaml: 2,048).
    cleaners: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=8192))
    scorers: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    lines_per_block: int = 20_000
    # Same input → the same kept rows in the same order every run (the weak stage's batches follow that order): Ray
    # Data keeps the input order and one dedup task runs at a time, so the first copy in input order is the one kept.
    # False runs dedup tasks in parallel (faster on many cores; one dedup task caps a deterministic run at ~150k
    # rows/s, bench/curation.py); the kept copy of a duplicate then depends on timing.
    deterministic: bool = True
    inject_failure_at: str | None = None  # chaos test: the dedup task holding this input row (file:line) dies once


@dataclass
class CLRConfig:
    """Cross-lingual retrieval set (`jobs/build_clr.py`): translate the queries of retrieval triples into languages
    drawn with Table 7's proportions; positives and negatives stay in the source language."""

    inputs: list[str] = field(default_factory=list)  # retrieval-triple parquet / JSONL; [] = English XQuAD triples
    output_dir: str = "runs/clr"
    data_root: str = field(default_factory=default_data_root)
    ray_address: str | None = None
    backend: Literal["lookup", "hf", "vllm"] = "lookup"
    model: str | None = None  # hf / vllm: a local model directory (or hub id on a GPU image with its own cache)
    languages: list[str] | None = None  # target languages (None: Table 7's, cut to what the backend can produce)
    seed: int = 0
    max_retries: int = 2  # a failed translation is tried again this many times, then rejected with its reason
    max_new_tokens: int = 64
    temperature: float = 0.0  # first try; retries sample at retry_temperature
    retry_temperature: float = 0.7
    num_negatives: int = 7  # negatives of the default XQuAD triples
    max_rows: int | None = None
    translators: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(batch_size=16))
    # The Python of the environment the translation actors run in (Ray runtime_env `py_executable`): vLLM pins its own
    # torch / transformers, so it lives in an environment of its own (`make vllm-env` builds .venv-vllm/bin/python,
    # with Ray at this cluster's version). None = this process's environment (a GPU image with vLLM installed).
    translator_python: str | None = None
    # vllm.LLM(...) keyword arguments, e.g. {gpu_memory_utilization: 0.05} on CPU, where that fraction of host memory
    # is the KV cache; {tensor_parallel_size: 2} on GPUs.
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    inject_failure_at: str | None = None  # chaos test: the translator holding this input row (file:line) dies once


EvalTask = Literal["xquad-retrieval", "xquad-clr", "stsb", "stsb-cross", "banking77", "csl-categories", "tatoeba"]
EVAL_TASKS: tuple[str, ...] = typing.get_args(EvalTask)


@dataclass
class EvalConfig:
    """Evaluation of an exported embedding model (`conan evaluate`) on local data, with baselines."""

    LEAST: ClassVar[dict[str, int]] = {"max_items": 1, "batch_size": 1}

    model_dir: str = "runs/tiny/supervised/model"
    model_name: str | None = None  # label in the report (default: the directory's name, its parent's for …/model)
    # Other exported models scored side by side at full size, in report order (e.g. the untrained init, then the
    # weak-stage model); the first is the reference a trained model must beat.
    baselines: list[str] = field(default_factory=list)
    output_dir: str = "runs/tiny/eval"
    data_root: str = field(default_factory=default_data_root)
    tasks: list[EvalTask] = field(default_factory=lambda: list(EVAL_TASKS))
    beir: list[str] = field(default_factory=list)  # BEIR folders: corpus.jsonl, queries.jsonl, qrels/test.tsv
    dims: list[int] | None = None  # Matryoshka dims to score (default: the model's matryoshka_dims)
    max_items: int | None = 500  # cap per task and language: queries, pairs, test texts, sentences
    langs: list[str] | None = None  # languages of the multilingual tasks (default: all the data holds)
    bm25: bool = True  # BM25 on the retrieval tasks
    mteb: bool = False  # also score every subset (retrieval, STS, classification, bitext) through mteb's evaluators
    plots: bool = True
    batch_size: int = 64
    max_length: int | None = None  # tokens per text; None = the length the model was trained at (its export says)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {k: _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads "2e-5" as a string; accept numeric strings for float fields.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def _build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a mapping, checking every key and type."""
    where = prefix or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (valid keys here: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    built = cls(**kwargs)
    _check_bounds(built, prefix)
    return built


def _check_bounds(config: Any, prefix: str) -> None:
    """ConfigError naming the key of a value under its class's LEAST (minimum), at or under its ABOVE (exclusive
    bound), or an empty list or a repeated value in its NOT_EMPTY: a negative step count trained nothing and
    exported the init, log_every=0 failed inside a worker, an empty sweep grid failed after Ray started, a repeated
    one misaligned the results table."""
    for name, least in getattr(config, "LEAST", {}).items():
        value = getattr(config, name)
        if value is not None and value < least:
            raise ConfigError(f"{f'{prefix}.{name}' if prefix else name}: must be at least {least}, got {value}")
    for name, bound in getattr(config, "ABOVE", {}).items():
        value = getattr(config, name)
        if value is not None and not value > bound:
            raise ConfigError(f"{f'{prefix}.{name}' if prefix else name}: must be above {bound}, got {value}")
    for name in getattr(config, "NOT_EMPTY", ()):  # grids: one trial per value, each value once
        values = getattr(config, name)
        if not values or len(set(values)) < len(values):
            raise ConfigError(f"{f'{prefix}.{name}' if prefix else name}: must name at least one value, each once "
                              f"(got {values})")


def _set_dotted(tree: dict, dotted: str, value: Any, cls: type | None = None) -> None:
    """Set tree[a][b]… = value for 'a.b.…'. A mapping field the tree does not hold yet starts from its default, so
    `supervised.task_weights.clr=0.5` changes one weight and keeps the others (cls: the dataclass of the tree)."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        default = _field_default(cls, part)
        cls = _field_type(cls, part)
        child = node.setdefault(part, dict(default) if isinstance(default, dict) else {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _field_type(cls: type | None, name: str) -> type | None:
    """The dataclass annotated on cls.name (None when it is not a dataclass)."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(name)
    return tp if dataclasses.is_dataclass(tp) else None


def _field_default(cls: type | None, name: str) -> Any:
    """cls.name's default value (None when cls is no dataclass or the field has none)."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else (
                None if f.default is dataclasses.MISSING else f.default)
    return None


def setting(key: str, value: Any) -> str:
    """The override `key=value` for a value the platform itself passes on: written as JSON (which YAML reads back
    exactly), so a path holding "#" or ": " stays that path."""
    return f"{key}={json.dumps(value)}"


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'a.b=value' into ('a.b', YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: its value is not valid YAML ({str(e).splitlines()[0]})") from e


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: list[str] | None = None) -> T:
    """Load dataclass `cls` from a YAML file (or defaults), then apply dotted `key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for text in overrides or []:
        _set_dotted(data, *parse_override(text), cls)
    return _build(cls, data)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild (and re-check) a config from plain data, e.g. inside a Ray worker."""
    return _build(cls, data)


def to_dict(config: Any) -> dict:
    """The config as plain data (for YAML dumps and Ray's pickling)."""
    return dataclasses.asdict(config)


# What a config makes, as the pipeline's step records and a stage's export marker keep it.
LOCATIONS = {"output_dir", "ray_address", "data_root"}  # keys that say where things are, not what they are
# Settings that change how a step runs, not what it makes (and a stage's data.root, a location): a stage's resources
# and reporting, mining's placement and search buffers, the evaluation's batch (float rounding at most), how a data
# step reads its input; and any actor pool's resources (RESOURCES: cleaners.cpus, dhnm.mining.actors.size, …).
UNRECORDED = {"data.root", "train.cpus_per_worker", "train.log_every", "train.checkpoint_every",
              "train.keep_checkpoints", "train.max_failures", "train.inject_failure_at_step", "train.log_row_ids",
              "model.activation_checkpointing", "dhnm.pool_resources", "dhnm.mining.in_process_work",
              "dhnm.mining.query_chunk_bytes", "dhnm.mining.query_batch", "dhnm.mining.search_tasks",
              "dhnm.mining.search_cpus", "batch_size", "lines_per_block", "translator_python"}
RESOURCES = {"size", "cpus", "gpus"}  # an ActorPoolConfig's resources, wherever it sits


def recorded_settings(settings: dict, out: Path) -> dict:
    """Settings as a step record keeps them: dotted keys, without what only says where things are (LOCATIONS) or how
    a stage runs (UNRECORDED), paths inside the run relative to it (a moved run keeps its records)."""
    roots = sorted({str(out), str(out.resolve())}, key=len, reverse=True)

    def relative(value):
        if isinstance(value, str):
            root = next((r for r in roots if value == r or value.startswith(r + "/")), None)
            return "<run>" + value[len(root):] if root else value
        return [relative(v) for v in value] if isinstance(value, (list, tuple)) else value

    flat = {}
    def walk(prefix: str, value):
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif prefix not in UNRECORDED and prefix.rsplit(".", 1)[-1] not in LOCATIONS | RESOURCES:
            flat[prefix] = relative(value)
    walk("", settings)
    return flat


def settings_changes(old: dict, new: dict) -> str:
    """How two recorded settings differ, in words ('' when they do not): the first four keys, old → new."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "(unset)") != new.get(k, "(unset)"))
    shown = "; ".join(f"{k}: {old.get(k, '(unset)')} → {new.get(k, '(unset)')}" for k in keys[:4])
    return shown + ("; …" if len(keys) > 4 else "")
