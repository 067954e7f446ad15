"""The four training stages on one loop: each says what it reads, how it batches and what it minimises.

pretrain  causal LM on packed token blocks (documents joined by <|eos|>)
sft       causal LM on (instruction, input, output), loss on the output tokens only
weak      InfoNCE with in-batch negatives over the global batch, soft mask scheduled over the stage
supervised task-homogeneous batches: retrieval / clr / classification (InfoNCE with hard negatives),
          sts (CoSENT), every loss wrapped in Matryoshka over the configured dims; each task a plug-in
          (conan.train.tasks) with its own columns, collate and loss

A stage reads its rows from shard files (conan.data.shards) through a GroupedStream: batches are a pure function
of (seed, micro-batch index, rank, world size), so a resumed run sees exactly the data an uninterrupted one would.
Pretraining reads token blocks packed upstream, the other stages token ids written upstream (conan.data.tokenize:
`Stage.worker_shards`, `Stage.token_columns`), and the DHNM negatives' ids come from the pre-tokenized passage lookup:
workers never tokenize.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from conan.config import JobConfig
from conan.data.passages import PassageLookup
from conan.data.input_rows import RowSpec, column_types, neutral_value
from conan.data.stream import DataPosition, GroupedStream
from conan.data.tokenize import TokenEncoder, pack_documents, text_token_columns, token_shards_key, tokenize_shards
from conan.losses import gather_with_grad, infonce_loss, positive_copies_mask
from conan.model import ConanForCausalLM, ConanForEmbedding
from conan.model.attention import pack_texts
from conan.model.soft_mask import soft_mask_alpha
from conan.tokenizer import INPUT, INSTRUCTION, OUTPUT
from conan.train.batching import batch_tokens, gather_detached, pad_batch, to_device
from conan.train.diagnostics import contrastive_stats
from conan.train.tasks import TASKS


class Stage:
    """What differs between stages; the loop in conan.train.loop does the rest."""

    name: str
    model_class: type
    # Columns of the stage's input rows (a user's parquet/JSONL must have them, or an alias, or a default).
    columns: tuple[str, ...]
    input_kind: str  # the manifest kind of the stage's shards
    aliases: dict[str, str] = {}  # column → another record kind's column that stands in for it
    defaults: dict[str, object] = {}  # columns a file may lack

    batch_by: list[str] = []  # the columns every global batch shares unless data.batch_by says otherwise

    def __init__(self, cfg: JobConfig, tokenizer, rank: int = 0, world_size: int = 1):
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size
        self.seq_len = cfg.data.seq_len
        self.window: dict[str, list[float]] = defaultdict(list)  # figures since the last report

    @classmethod
    def row_spec(cls, cfg: JobConfig) -> RowSpec:
        """The columns the stage reads and what its shards are grouped by."""
        columns = cls.batch_by if cfg.data.batch_by is None else cfg.data.batch_by
        return RowSpec(cls.columns, cls.aliases, cls.defaults, tuple(cls.group_prefix + list(columns)))

    group_prefix: list[str] = []  # columns a shard group always starts with (the supervised task)

    @classmethod
    def worker_shards(cls, dirs: list[str], out: Path, cfg: JobConfig, tokenizer_dir: str) -> list[str]:
        """The shard directories the workers read, made under `out` from the input's shard directories `dirs`: their
        token shards (`token_columns`, a Ray Data job, so workers never tokenize)."""
        kind = f"{cls.name}_tokens"
        key = token_shards_key(dirs, tokenizer_dir, cfg.data.seq_len)
        return [str(tokenize_shards(dirs, out / f"{kind}-{key}", str(tokenizer_dir), cfg.data.seq_len, kind,
                                    cls.token_columns, concurrency=max(1, cfg.train.num_workers)).directory)]

    @classmethod
    def token_columns(cls, group: str, table: pa.Table, encoder: TokenEncoder) -> dict[str, pa.Array]:
        """The token shard columns of one text shard file of `group` (the rows a worker's batch reads)."""
        raise NotImplementedError

    def prepare(self, files: dict, stats: dict) -> None:
        """Open this worker's stream over the shards' groups (files: group → [(path, rows)]; stats: the manifest's)."""
        self.stream = GroupedStream(files, self.group_weights({g: sum(n for _, n in fs) for g, fs in files.items()}),
                                    self.cfg.train.steps * self.cfg.train.grad_accum, self.cfg.train.seed, self.rank,
                                    self.world_size, self.group_batch, pool=lambda g: f"{g.split('/')[0]}/mixed"
                                    if "/" in g else "mixed", window=self.cfg.data.shuffle_window,
                                    bucket=self.cfg.data.bucket_batches,
                                    memory_bytes=self.cfg.data.reader_memory_mb << 20)
        if self.stream.windows and self.rank == 0:
            cut = sorted(self.stream.windows.values())
            print(f"[{self.name}] data.reader_memory_mb={self.cfg.data.reader_memory_mb} holds {len(files)} groups: "
                  f"{len(cut)} shuffle windows cut to {cut[0]:,}-{cut[-1]:,} rows (data.shuffle_window "
                  f"{self.cfg.data.shuffle_window:,}); raise it to shuffle over more rows", flush=True)
        self.reads_reported = 0

    @classmethod
    def data_position(cls, cfg: JobConfig, manifests: list, world_size: int) -> DataPosition:
        """What fixes the rows of every step of a run over these token shards' manifests (saved in its checkpoints)."""
        return DataPosition(cfg.train.seed, world_size, tuple(m.fingerprint() for m in manifests), cls.ordering(cfg))

    @classmethod
    def ordering(cls, cfg: JobConfig) -> dict[str, object]:
        """The settings that, with the seed, the world size and the data, fix which rows each step reads (a resume
        that changes one is refused)."""
        return {"train.micro_batch_size": cfg.train.micro_batch_size, "train.grad_accum": cfg.train.grad_accum,
                "data.shuffle_window": cfg.data.shuffle_window, "data.bucket_batches": cfg.data.bucket_batches,
                "data.reader_memory_mb": cfg.data.reader_memory_mb}

    def group_weights(self, rows: dict[str, int]) -> dict[str, float]:
        """Each group's share of the micro-batches: its rows."""
        return {g: float(n) for g, n in rows.items()}

    def group_batch(self, group: str) -> int:
        """The rows a micro-batch of this group reads (a group with fewer per rank is pooled)."""
        return self.cfg.train.micro_batch_size

    def rows(self, index: int, batch_size: int | None = None) -> tuple[str, list[dict]]:
        """(group, rows) of the index-th micro-batch of this worker."""
        return self.stream.batch(index, batch_size or self.cfg.train.micro_batch_size)

    def batch(self, index: int) -> dict:
        """The index-th micro-batch of this worker (its rows' ids under "row_ids")."""
        raise NotImplementedError

    def loss(self, engine, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch and its counters (samples, tokens, …)."""
        raise NotImplementedError

    def note(self, figures: dict[str, float], prefix: str = "") -> None:
        """Keep figures of one micro-batch for the next report (averaged there)."""
        for key, value in figures.items():
            self.window[prefix + key].append(value)

    def metrics(self) -> dict:
        """Stage-specific figures since the last report: the means of what `note` kept, plus `chance_ratio`, the worst
        contrastive loss of the window as a fraction of its log N (the loop warns when it stays near 1), and the
        shard reader's memory and row groups read since the last report."""
        out = {key: float(np.mean(values)) for key, values in self.window.items() if values}
        self.window.clear()
        cache = self.stream.cache
        out.update(reader_cache_mb=cache.bytes / 2**20, reader_row_group_reads=cache.reads - self.reads_reported)
        self.reads_reported = cache.reads
        ratios = [value / out[log_n] for key, value in out.items() if "infonce_loss" in key
                  and out.get(log_n := key.split("infonce_loss")[0] + "log_candidates")]
        if ratios:
            out["chance_ratio"] = max(ratios)
        return out

    def prefetch(self, index: int) -> None:
        """Start what the index-th micro-batch waits on that can run beside the current step's compute (the loop calls
        it after the current micro-batch's backward pass)."""

    def state_dict(self) -> dict:
        """Extra state saved with every checkpoint (batches themselves need none: they derive from the step)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""

    def start_over(self) -> None:
        """Put what state_dict saves back to its start (a run from step 0, perhaps after an attempt that failed before
        its first checkpoint)."""

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id."""
        return self.tokenizer.pad_token_id

    def text_batch(self, sequences: list[list[int]]) -> dict:
        """One embedding forward pass's texts: packed into one unpadded row (input_ids, documents) when
        data.pack_texts, else right-padded."""
        if not self.cfg.data.pack_texts:
            return pad_batch(sequences, self.pad_id)
        input_ids, documents = pack_texts(sequences)
        return {"input_ids": input_ids, "documents": documents}


class PretrainStage(Stage):
    """Causal LM on token blocks packed upstream (documents joined by <|eos|>; a shard's last block may be shorter)."""

    name, model_class, columns, input_kind = "pretrain", ConanForCausalLM, ("text",), "documents"

    @classmethod
    def worker_shards(cls, dirs, out, cfg, tokenizer_dir):
        """Documents tokenized and packed into seq_len blocks."""
        key = token_shards_key(dirs, tokenizer_dir, cfg.data.seq_len)
        return [str(pack_documents(dirs, out / f"blocks-{key}", str(tokenizer_dir), cfg.data.seq_len,
                                   concurrency=max(1, cfg.train.num_workers)).directory)]

    def prepare(self, files, stats):
        super().prepare(files, stats)
        self.unigram_entropy = stats["unigram_entropy"]

    def batch(self, index):
        _, rows = self.rows(index)
        ids = [r["ids"] for r in rows]
        return {**pad_batch(ids, self.pad_id, ids), "row_ids": [r["row_id"] for r in rows]}

    def loss(self, engine, batch, step):
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {"samples": len(batch["input_ids"]), "tokens": int(batch["attention_mask"].sum())}

    def metrics(self):
        """The corpus's unigram entropy: a loss above it predicts token frequencies, not text."""
        return {**super().metrics(), "unigram_entropy": self.unigram_entropy}


def prompt_ids(instruction: list[int], text: list[int], budget: int, markers: tuple[int, int, int]) -> list[int]:
    """<|instruction|> instruction <|input|> text <|output|> in at most `budget` tokens: the instruction keeps at most
    half the room, the text is cut to the rest, and the three markers always stay."""
    room = budget - len(markers)
    instruction = instruction[:room // 2]
    return [markers[0], *instruction, markers[1], *text[:room - len(instruction)], markers[2]]


class SFTStage(Stage):
    """Causal LM on instruction / input / output, loss on the output tokens only; the three texts are tokenized
    upstream and the worker assembles each prompt from their ids."""

    name, model_class, columns = "sft", ConanForCausalLM, ("instruction", "input", "output")
    input_kind = "instructions"
    defaults = {"instruction": "", "input": ""}  # an instruction alone, or an input alone, makes a prompt

    @classmethod
    def token_columns(cls, group, table, encoder):
        """instruction_ids, input_ids, output_ids, each ending with <|eos|>."""
        return text_token_columns(table, encoder, cls.columns)

    def batch(self, index):
        _, rows = self.rows(index)
        markers = tuple(self.tokenizer.convert_tokens_to_ids([INSTRUCTION, INPUT, OUTPUT]))
        examples = []
        for r in rows:  # the prompt's texts without their <|eos|>; the answer ends with it (unless cut)
            p = prompt_ids(r["instruction_ids"][:-1], r["input_ids"][:-1], self.seq_len // 2, markers)
            o = r["output_ids"][:self.seq_len - len(p)]  # keep room for the answer
            examples.append((p + o, [-100] * len(p) + o))
        return {**pad_batch([e[0] for e in examples], self.pad_id, [e[1] for e in examples]),
                "row_ids": [r["row_id"] for r in rows]}

    def loss(self, engine, batch, step):
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {"samples": len(batch["input_ids"]), "tokens": int(batch["attention_mask"].sum())}


class WeakStage(Stage):
    """InfoNCE on (input, output) pairs with in-batch negatives and the soft mask; by default every global batch shares
    one language and source (data.batch_by), so negatives are not told apart by language alone. Queries are bare text
    (no SFT instruction), as the evaluation, the server and sentence-transformers encode them."""

    name, model_class, input_kind = "weak", ConanForEmbedding, "pairs"
    columns = ("input", "output", "lang", "source")
    # Curated weak pairs (conan curate) name them query / positive.
    aliases, defaults = {"input": "query", "output": "positive"}, {"lang": "", "source": ""}
    batch_by = ["source", "lang"]

    @classmethod
    def token_columns(cls, group, table, encoder):
        """input_ids, output_ids and output_key (the positive-copies mask's key)."""
        return text_token_columns(table, encoder, ["input", "output"], ["output"])

    def batch(self, index):
        _, rows = self.rows(index)
        return {"query": self.text_batch([r["input_ids"] for r in rows]),
                "passage": self.text_batch([r["output_ids"] for r in rows]),
                "passage_keys": torch.tensor([r["output_key"] for r in rows], dtype=torch.int64),
                "row_ids": [r["row_id"] for r in rows]}

    def alpha(self, step: int) -> float:
        """Soft-mask alpha(t) at this step (1.0 = bidirectional when the soft mask is off)."""
        sm = self.cfg.soft_mask
        return soft_mask_alpha(step, self.cfg.train.steps, sm.schedule) if sm.enabled else 1.0

    def loss(self, engine, batch, step):
        alpha = self.alpha(step)
        # Queries and passages are padded (or packed) separately: short queries are not padded to passage length, and
        # eq. 4's l is each side's longest text.
        queries, passages = (engine(**batch[side], attention_mode="soft", soft_mask_alpha=alpha,
                                    soft_mask_rank_reduction=self.cfg.soft_mask.rank_reduction)
                             for side in ("query", "passage"))
        b = len(queries)
        target = torch.arange(b, device=queries.device) + self.rank * b
        allowed = positive_copies_mask(gather_detached(batch["passage_keys"]), target)
        loss, scores = infonce_loss(queries, gather_with_grad(passages), target, self.cfg.loss.temperature, allowed)
        self.note({"infonce_loss": float(loss.detach()), **contrastive_stats(scores, target, allowed, passages)})
        return loss, {"samples": b, "tokens": batch_tokens(batch), "alpha": alpha}


class SupervisedStage(Stage):
    """Multi-task contrastive training: one task per step (the same on every worker), drawn from the seed by
    supervised.task_weights; each task (conan.train.tasks: retrieval, CLR, classification, STS) collates its rows and
    computes its loss, Matryoshka over loss.matryoshka_dims. Owns what tasks share: the DHNM pool and its passages."""

    name, model_class, input_kind = "supervised", ConanForEmbedding, "tasks"
    # Every registered task's columns join these in row_spec. Retrieval / CLR triples (conan clr) lack the STS
    # columns, passage ids and keys (a passage is then its text); their passages' language is doc_lang.
    columns = ("task", "lang")
    aliases = {"lang": "doc_lang"}
    defaults = {"lang": ""}
    batch_by = ["lang"]  # within a task: candidates of one language, as in the weak stage
    group_prefix = ["task"]
    RESCORE_CHUNK = 16  # queries per extra forward pass of the v1 re-scoring baseline

    def __init__(self, cfg, tokenizer, rank=0, world_size=1, pool_names: list[str] | None = None):
        super().__init__(cfg, tokenizer, rank, world_size)
        self.pool = None
        if pool_names:
            from conan.dhnm import NegativePoolClient
            self.pool = NegativePoolClient.connect(pool_names)
        self.rescored_step = -1
        self.prefetched_rows: tuple[int, list[dict]] | None = None  # (micro-batch index, its rows): `prefetch`

    @classmethod
    def row_spec(cls, cfg):
        """task, every registered task's columns (those some task's rows must have first, then those every task
        defaults: the order shards were always written in), lang; read from TASKS when the spec is made. A file may
        mix tasks or hold one: a row must hold its own task's columns (SupervisedTask.needs), and takes a neutral
        value for the others'."""
        spec = super().row_spec(cfg)
        defaults = {**{c: v for t in TASKS.values() for c, v in t.defaults.items()}, **spec.defaults}
        columns = [c for t in TASKS.values() for c in t.columns]
        ordered = ("task", *dict.fromkeys([*(c for c in columns if c not in defaults),
                                           *(c for c in columns if c in defaults)]), "lang")
        types = column_types(ordered, defaults)
        filled = {c: defaults[c] if c in defaults else neutral_value(types[c]) for c in ordered if c != "task"}
        return replace(spec, columns=ordered, defaults=filled, kinds={name: t.needs() for name, t in TASKS.items()})

    @staticmethod
    def passage_lookup_path(cfg) -> Path:
        """Where the launcher writes dhnm.passages as the workers' memory-mapped lookup file."""
        return Path(cfg.output_dir) / "shards" / "passages.arrow"

    @classmethod
    def token_columns(cls, group, table, encoder):
        """The token columns of the group's task (conan.train.tasks: each task's `token_columns`)."""
        task = task_of(group)
        if task not in TASKS:
            raise ValueError(f"unknown supervised tasks {[task]} (rows of {group}); known: {sorted(TASKS)} "
                             "(conan.train.tasks.TASKS)")
        return TASKS[task].token_columns(table, encoder)

    def group_weights(self, rows):
        """A task's weight (supervised.task_weights), shared by its groups in proportion to their rows."""
        sup = self.cfg.supervised
        tasks = {task_of(g) for g in rows}
        task_weights = {t: sup.task_weights.get(t, 0.0) for t in tasks}
        if not any(w > 0 for w in task_weights.values()):  # e.g. every task with rows set to 0
            raise ValueError(f"supervised.task_weights {dict(sup.task_weights)}: none of the tasks with rows "
                             f"{sorted(tasks)} has a positive weight")
        per_task: dict[str, int] = defaultdict(int)
        for g, n in rows.items():
            per_task[task_of(g)] += n
        return {g: task_weights[task_of(g)] * n / per_task[task_of(g)] for g, n in rows.items()}

    @classmethod
    def ordering(cls, cfg):
        """Each task's batch size and its share of the steps in place of train.micro_batch_size (a task weighted 0
        is never drawn; weights in proportion draw the same tasks)."""
        sup = cfg.supervised
        weights = {t: w for t, w in sorted(sup.task_weights.items()) if w > 0}
        total = sum(weights.values())
        ordering = {k: v for k, v in super().ordering(cfg).items() if k != "train.micro_batch_size"}
        return {**ordering, "supervised.task_weights": {t: w / total for t, w in weights.items()},
                "supervised.batch_sizes": {t: sup.batch_sizes.get(t) for t in weights}}

    def group_batch(self, group):
        """Its task's batch (supervised.batch_sizes): an STS group of 20 rows a rank is pooled at batch 32. A task
        without one has weight 0 (check_inputs refuses a weighted one): its groups are never drawn."""
        return self.cfg.supervised.batch_sizes.get(task_of(group), 1)

    def prepare(self, files, stats):
        super().prepare(files, stats)
        self.dims = self.cfg.loss.matryoshka_dims
        if self.pool is not None:  # passages the pool's candidate ids point at, memory-mapped
            self.passages = PassageLookup(self.passage_lookup_path(self.cfg))

    def prefetch(self, index):
        """Read the index-th micro-batch's rows now and, for the rows DHNM manages, ask the pool for their negatives:
        its round trips to the shards then overlap this step's optimizer step instead of delaying the next batch."""
        task, _, rows = self._micro_batch(index)
        self.prefetched_rows = (index, rows)
        if queries := [rows[i]["query_id"] for i in TASKS[task].pool_rows(self, rows)]:
            self.pool.prefetch(queries)

    def batch(self, index):
        task, size, chosen = self._micro_batch(index)
        return {**TASKS[task].collate(self, chosen), "task": task, "size": size,
                "row_ids": [r["row_id"] for r in chosen]}

    def _micro_batch(self, index: int) -> tuple[str, int, list[dict]]:
        """The index-th micro-batch's task, batch size and rows (those `prefetch` read for it, when it did)."""
        task = task_of(self.stream.group(index))
        size = self.cfg.supervised.batch_sizes[task]
        prefetched, self.prefetched_rows = self.prefetched_rows, None
        rows = prefetched[1] if prefetched and prefetched[0] == index else self.rows(index, size)[1]
        return task, len(rows), rows

    def loss(self, engine, batch, step):
        dims = self.dims or engine.module.config.matryoshka_dims
        loss = TASKS[batch["task"]].loss(self, engine, batch, dims)
        every = self.cfg.dhnm.rescore_every
        if self.pool is not None and every and step % every == 0 and step != self.rescored_step:
            self.rescored_step = step
            self._rescore(engine.module)
        return loss, {"samples": batch["size"], "tokens": batch_tokens(batch)}

    def _rescore(self, model) -> None:
        """The v1 baseline (dhnm.rescore_every = K): every K steps an extra no-grad forward pass over every managed
        query of this worker and its active negatives; those scores go to the pool instead of the loss's."""
        rows = [r for g, stream in self.stream.streams.items() if TASKS[task_of(g)].mined
                for r in stream.epoch_rows(0) if r.get("query_id")]
        device = next(model.parameters()).device
        for start in range(0, len(rows), self.RESCORE_CHUNK):
            part = rows[start:start + self.RESCORE_CHUNK]
            assigned = self.pool.assign([r["query_id"] for r in part])
            kept = [(r["query_id"], r["query_ids"], ids) for r, ids in zip(part, assigned) if ids]
            if not kept:
                continue
            negatives, _ = self.passages.take_tokens([j for *_, ids in kept for j in ids])
            with torch.no_grad():
                q = model(**to_device(pad_batch([query for _, query, _ in kept], self.pad_id), device))
                n = model(**to_device(pad_batch(negatives, self.pad_id), device))
            counts = [len(ids) for *_, ids in kept]  # a query with few mined candidates has fewer than k
            owner = torch.repeat_interleave(torch.arange(len(kept), device=device), torch.tensor(counts, device=device))
            scores = (q[owner] * n).sum(-1).split(counts)
            self.pool.report([qid for qid, *_ in kept], [ids for *_, ids in kept], [s.tolist() for s in scores])

    def metrics(self) -> dict:
        """Per-task figures since the last report (loss per Matryoshka dim, cosines, log N) and the pool's counters."""
        out = super().metrics()
        if self.pool is not None:
            out.update({f"dhnm_{k}": v for k, v in self.pool.stats().items()})
        return out

    def state_dict(self) -> dict:
        """The pool's state once every worker's reports have landed (rank 0 keeps it)."""
        if self.pool is None:
            return {}
        self.pool.flush()
        if dist.is_initialized():
            dist.barrier()
        return {"dhnm": self.pool.state_dict()} if self.rank == 0 else {}

    def load_state_dict(self, state: dict) -> None:
        """Put the pool back to the checkpoint's state before any worker asks it for negatives."""
        if self.pool is not None and self.rank == 0:
            self.pool.load_state_dict(state["dhnm"])
        if self.pool is not None and dist.is_initialized():
            dist.barrier()

    def start_over(self) -> None:
        """Put the pool back to its mined candidates before any worker asks it for negatives."""
        if self.pool is not None and self.rank == 0:
            self.pool.reset()
        if self.pool is not None and dist.is_initialized():
            dist.barrier()


def task_of(group: str) -> str:
    """The supervised task of a batch group ("retrieval/de" → "retrieval")."""
    return group.split("/")[0]


STAGES: dict[str, type[Stage]] = {s.name: s for s in (PretrainStage, SFTStage, WeakStage, SupervisedStage)}


def stage_class(name: str) -> type[Stage]:
    """The Stage class for a stage name."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return STAGES[name]


def export_path(cfg: JobConfig) -> Path:
    """Where the stage's final Hugging Face model directory goes."""
    return Path(cfg.output_dir) / "model"
