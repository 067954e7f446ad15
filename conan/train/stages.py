"""The four training stages on one loop: each says what it reads, how it batches and what it minimises.

pretrain  causal LM on packed token blocks (documents joined by <|eos|>)
sft       causal LM on (instruction, input, output), loss on the output tokens only
weak      InfoNCE with in-batch negatives over the global batch, soft mask scheduled over the stage
supervised task-homogeneous batches: retrieval / clr / classification (InfoNCE with hard negatives),
          sts (CoSENT), every loss wrapped in Matryoshka over the configured dims

A stage reads its rows from shard files (conan.data.shards) through a GroupedStream: batches are a pure function
of (seed, micro-batch index, rank, world size), so a resumed run sees exactly the data an uninterrupted one would.
Pretraining reads token blocks packed upstream (conan.data.tokenize); pair stages tokenize a micro-batch's rows as
they read them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from conan.config import JobConfig
from conan.data.dedup import exact_keys
from conan.data.mining import read_passages
from conan.losses import cosent_loss, gather_with_grad, infonce_loss, matryoshka_loss, positive_copies_mask
from conan.model import ConanForCausalLM, ConanForEmbedding
from conan.model.soft_mask import soft_mask_alpha
from conan.tokenizer import INPUT, INSTRUCTION, OUTPUT
from conan.data.shards import RowSpec
from conan.data.stream import GroupedStream
from conan.train.diagnostics import contrastive_stats


def pad_batch(sequences: list[list[int]], pad_id: int, label_sequences: list[list[int]] | None = None) -> dict:
    """Right-pad token id lists into input_ids / attention_mask (and labels, -100 on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if label_sequences is not None:
        labels = torch.full_like(ids, -100)
        for i, s in enumerate(label_sequences):
            labels[i, :len(s)] = torch.tensor(s)
        batch["labels"] = labels
    return batch


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

    def prepare(self, files: dict, stats: dict) -> None:
        """Open this worker's stream over the shards' groups (files: group → [(path, rows)]; stats: the manifest's)."""
        self.stream = GroupedStream(files, self.group_weights({g: sum(n for _, n in fs) for g, fs in files.items()}),
                                    self.cfg.train.steps * self.cfg.train.grad_accum, self.cfg.train.seed, self.rank,
                                    self.world_size, self.smallest_batch(), pool=lambda g: f"{g.split('/')[0]}/mixed"
                                    if "/" in g else "mixed", window=self.cfg.data.shuffle_window)

    def group_weights(self, rows: dict[str, int]) -> dict[str, float]:
        """Each group's share of the micro-batches: its rows."""
        return {g: float(n) for g, n in rows.items()}

    def smallest_batch(self) -> int:
        """The smallest micro-batch any group is read in (smaller groups are pooled)."""
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
        contrastive loss of the window as a fraction of its log N (the loop warns when it stays near 1)."""
        out = {key: float(np.mean(values)) for key, values in self.window.items() if values}
        self.window.clear()
        ratios = [value / out[log_n] for key, value in out.items() if "infonce_loss" in key
                  and out.get(log_n := key.split("infonce_loss")[0] + "log_candidates")]
        if ratios:
            out["chance_ratio"] = max(ratios)
        return out

    def state_dict(self) -> dict:
        """Extra state saved with every checkpoint (batches themselves need none: they derive from the step)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of texts (each ending with <|eos|>), truncated to seq_len keeping the <|eos|>."""
        eos = self.tokenizer.eos_token_id
        out = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [ids if len(ids) <= self.seq_len else ids[:self.seq_len - 1] + [eos] for ids in out]


class PretrainStage(Stage):
    """Causal LM on token blocks packed upstream (documents joined by <|eos|>; a shard's last block may be shorter)."""

    name, model_class, columns, input_kind = "pretrain", ConanForCausalLM, ("text",), "documents"

    def prepare(self, files, stats):
        super().prepare(files, stats)
        self.unigram_entropy = stats["unigram_entropy"]

    def batch(self, index):
        _, rows = self.rows(index)
        ids = [r["ids"] for r in rows]
        return {**pad_batch(ids, self.tokenizer.pad_token_id, ids), "row_ids": [r["row_id"] for r in rows]}

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
    """Causal LM on instruction / input / output, loss on the output tokens only."""

    name, model_class, columns = "sft", ConanForCausalLM, ("instruction", "input", "output")
    input_kind = "instructions"

    def batch(self, index):
        _, rows = self.rows(index)
        tok = self.tokenizer
        markers = tuple(tok.convert_tokens_to_ids([INSTRUCTION, INPUT, OUTPUT]))
        instructions = tok([r["instruction"] for r in rows], add_special_tokens=False)["input_ids"]
        inputs = tok([r["input"] for r in rows], add_special_tokens=False)["input_ids"]
        outputs = tok([r["output"] for r in rows])["input_ids"]  # ends with <|eos|>
        examples = []
        for instruction, text, o in zip(instructions, inputs, outputs):
            p = prompt_ids(instruction, text, self.seq_len // 2, markers)  # keep room for the answer
            o = o[:self.seq_len - len(p)]
            examples.append((p + o, [-100] * len(p) + o))
        return {**pad_batch([e[0] for e in examples], tok.pad_token_id, [e[1] for e in examples]),
                "row_ids": [r["row_id"] for r in rows]}

    def loss(self, engine, batch, step):
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {"samples": len(batch["input_ids"]), "tokens": int(batch["attention_mask"].sum())}


def text_keys(texts: list[str]) -> torch.Tensor:
    """int64 content keys of passages (equal text, equal key) for the positive-copies mask."""
    return torch.from_numpy(exact_keys(texts).view(np.int64))


class WeakStage(Stage):
    """InfoNCE on (input, output) pairs with in-batch negatives and the soft mask; by default every global batch shares
    one language and source (data.batch_by), so negatives are not told apart by language alone. Queries are bare text
    (no SFT instruction), as the evaluation, the server and sentence-transformers encode them."""

    name, model_class, input_kind = "weak", ConanForEmbedding, "pairs"
    columns = ("input", "output", "lang", "source")
    # Curated weak pairs (conan curate) name them query / positive.
    aliases, defaults = {"input": "query", "output": "positive"}, {"lang": "", "source": ""}
    batch_by = ["source", "lang"]

    def batch(self, index):
        _, rows = self.rows(index)
        pad = self.tokenizer.pad_token_id
        return {"query": pad_batch(self.encode([r["input"] for r in rows]), pad),
                "passage": pad_batch(self.encode([r["output"] for r in rows]), pad),
                "passage_keys": text_keys([r["output"] for r in rows]), "row_ids": [r["row_id"] for r in rows]}

    def alpha(self, step: int) -> float:
        """Soft-mask alpha(t) at this step (1.0 = bidirectional when the soft mask is off)."""
        sm = self.cfg.soft_mask
        return soft_mask_alpha(step, self.cfg.train.steps, sm.schedule) if sm.enabled else 1.0

    def loss(self, engine, batch, step):
        alpha = self.alpha(step)
        # Queries and passages are padded separately (short queries are not padded to passage length).
        queries, passages = (engine(**batch[side], attention_mode="soft", soft_mask_alpha=alpha,
                                    soft_mask_rank_reduction=self.cfg.soft_mask.rank_reduction)
                             for side in ("query", "passage"))
        b = len(queries)
        target = torch.arange(b, device=queries.device) + self.rank * b
        allowed = positive_copies_mask(_gather(batch["passage_keys"]), target)
        loss, scores = infonce_loss(queries, gather_with_grad(passages), target, self.cfg.loss.temperature, allowed)
        self.note({"infonce_loss": float(loss.detach()), **contrastive_stats(scores, target, allowed, passages)})
        return loss, {"samples": b, "tokens": _tokens(batch), "alpha": alpha}


class SupervisedStage(Stage):
    """Multi-task contrastive training: one task per step (the same on every worker), MRL over dims."""

    name, model_class, input_kind = "supervised", ConanForEmbedding, "tasks"
    columns = ("task", "query", "positive", "negatives", "s1", "s2", "score", "query_id", "positive_id",
               "positive_key", "negative_keys", "lang")
    # Retrieval / CLR triples (conan clr) lack the STS columns, passage ids and keys (a passage is then its text);
    # their passages' language is doc_lang.
    aliases = {"lang": "doc_lang"}
    defaults = {"s1": "", "s2": "", "score": 0.0, "query_id": "", "positive_id": -1, "positive_key": "",
                "negative_keys": [], "lang": ""}
    batch_by = ["lang"]  # within a task: candidates of one language, as in the weak stage
    PAIR_TASKS = ("retrieval", "clr", "classification")
    RESCORE_CHUNK = 16  # queries per extra forward pass of the v1 re-scoring baseline

    def __init__(self, cfg, tokenizer, rank=0, world_size=1, pool_names: list[str] | None = None):
        super().__init__(cfg, tokenizer, rank, world_size)
        self.pool = None
        if pool_names:
            from conan.dhnm import NegativePoolClient
            self.pool = NegativePoolClient.connect(pool_names)
        self.rescored_step = -1

    group_prefix = ["task"]

    def group_weights(self, rows):
        """A task's weight (supervised.task_weights), shared by its groups in proportion to their rows."""
        sup = self.cfg.supervised
        tasks = {task_of(g) for g in rows}
        task_weights = {t: sup.task_weights.get(t, 0.0) for t in tasks}
        if not any(w > 0 for w in task_weights.values()):  # e.g. `--set supervised.task_weights.clr=0` replaces the map
            raise ValueError(f"supervised.task_weights {dict(sup.task_weights)}: none of the tasks with rows "
                             f"{sorted(tasks)} has a positive weight")
        unknown = {t for t, w in task_weights.items() if w > 0} - set(self.PAIR_TASKS) - {"sts"}
        if unknown:
            raise ValueError(f"unknown supervised tasks {sorted(unknown)}")
        per_task: dict[str, int] = defaultdict(int)
        for g, n in rows.items():
            per_task[task_of(g)] += n
        return {g: task_weights[task_of(g)] * n / per_task[task_of(g)] for g, n in rows.items()}

    def smallest_batch(self):
        """Groups are pooled by the smallest task batch (supervised.batch_sizes)."""
        weights = self.cfg.supervised.task_weights
        return min(n for t, n in self.cfg.supervised.batch_sizes.items() if weights.get(t, 0) > 0)

    def prepare(self, files, stats):
        super().prepare(files, stats)
        self.dims = self.cfg.loss.matryoshka_dims
        if self.pool is not None:  # passages the pool's candidate ids point at
            self.corpus = read_passages(self.cfg.dhnm.passages)

    def batch(self, index):
        task = task_of(self.stream.group(index))
        size = self.cfg.supervised.batch_sizes[task]
        _, chosen = self.rows(index, size)
        pad = self.tokenizer.pad_token_id
        row_ids = [r["row_id"] for r in chosen]
        if task == "sts":
            return {"task": task, "size": size, "row_ids": row_ids,
                    "pair": pad_batch(self.encode([r["s1"] for r in chosen] + [r["s2"] for r in chosen]), pad),
                    "score": torch.tensor([r["score"] for r in chosen], dtype=torch.float32)}
        k = self.cfg.supervised.num_negatives
        negatives = [r["negatives"][:k] for r in chosen]
        keys = [[r["positive_key"] or r["positive"]] for r in chosen] + [
            [key or text for key, text in zip(r["negative_keys"] or [""] * k, negs)] for r, negs in zip(chosen, negatives)]
        candidates = [i for i, r in enumerate(chosen) if self.pool is not None and r.get("query_id")]
        assigned = self.pool.assign([chosen[i]["query_id"] for i in candidates]) if candidates else []
        managed = [i for i, ids in zip(candidates, assigned) if ids is not None]
        negative_ids = [ids for ids in assigned if ids is not None]
        for i, ids in zip(managed, negative_ids):
            negatives[i] = keys[size + i] = [self.corpus[j] for j in ids]
        passages = [r["positive"] for r in chosen] + [n for negs in negatives for n in negs]
        return {"task": task, "size": size, "row_ids": row_ids,
                "query": pad_batch(self.encode([r["query"] for r in chosen]), pad),
                "passage": pad_batch(self.encode(passages), pad),
                "passage_keys": text_keys([key for row_keys in keys for key in row_keys]),
                "query_ids": [r.get("query_id") or "" for r in chosen],
                "dhnm": {"rows": managed, "negative_ids": negative_ids}}

    def loss(self, engine, batch, step):
        b, task = batch["size"], batch["task"]
        dims = self.dims or engine.module.config.matryoshka_dims
        counters = {"samples": b, "tokens": _tokens(batch)}
        if task == "sts":
            raw = engine(**batch["pair"], raw=True)
            left, right = gather_with_grad(raw[:b]), gather_with_grad(raw[b:])
            gold = _gather(batch["score"])
            loss, per_dim = matryoshka_loss(cosent_loss, (left, right), dims, gold, self.cfg.loss.cosent_scale)
            self.note({f"cosent_loss_d{d}": float(v.detach()) for d, v in per_dim.items()}, "sts_")
            return loss, counters
        queries = engine(**batch["query"], raw=True)
        local_passages = engine(**batch["passage"], raw=True)
        passages = gather_with_grad(local_passages)
        per_rank = len(local_passages)  # b positives then b*k negatives on every rank
        target = torch.arange(b, device=queries.device) + self.rank * per_rank
        # Another copy of a row's positive (the paragraph of another question, the same question in another
        # language, a repeated label) is no negative of that row.
        allowed = positive_copies_mask(_gather(batch["passage_keys"]), target)
        loss, per_dim = matryoshka_loss(infonce_loss, (queries, passages), dims, target,
                                        self.cfg.loss.temperature, allowed)
        scores = per_dim[max(per_dim)][1]
        own = self._track_negatives(scores, batch, self.rank * per_rank)
        self.note({**{f"infonce_loss_d{d}": float(v[0].detach()) for d, v in per_dim.items()},
                   **contrastive_stats(scores, target, allowed, local_passages[:b], own)}, f"{task}_")
        every = self.cfg.dhnm.rescore_every
        if self.pool is not None and every and step % every == 0 and step != self.rescored_step:
            self.rescored_step = step
            self._rescore(engine.module)
        return loss, counters

    def _rescore(self, model) -> None:
        """The v1 baseline (dhnm.rescore_every = K): every K steps an extra no-grad forward pass over every managed
        query of this worker and its active negatives; those scores go to the pool instead of the loss's."""
        rows = [r for g, stream in self.stream.streams.items() if task_of(g) in ("retrieval", "clr")
                for r in stream.epoch_rows(0) if r.get("query_id")]
        device, pad = next(model.parameters()).device, self.tokenizer.pad_token_id
        for start in range(0, len(rows), self.RESCORE_CHUNK):
            part = rows[start:start + self.RESCORE_CHUNK]
            assigned = self.pool.assign([r["query_id"] for r in part])
            kept = [(r["query_id"], r["query"], ids) for r, ids in zip(part, assigned) if ids is not None]
            if not kept:
                continue
            with torch.no_grad():
                q = model(**to_device(pad_batch(self.encode([text for _, text, _ in kept]), pad), device))
                n = model(**to_device(pad_batch(self.encode([self.corpus[j] for *_, ids in kept for j in ids]), pad),
                                      device))
            scores = torch.einsum("qd,qkd->qk", q, n.view(len(kept), -1, n.shape[-1]))
            self.pool.report([qid for qid, *_ in kept], [ids for *_, ids in kept], scores.tolist())

    def _track_negatives(self, scores: torch.Tensor, batch: dict, base: int) -> torch.Tensor:
        """Read each query's own-negative cosines (b, k) off the loss's similarity matrix (no extra forward pass);
        report them to the DHNM pool for the rows it manages."""
        b, k = batch["size"], self.cfg.supervised.num_negatives
        own = torch.stack([scores[i, base + b + i * k: base + b + (i + 1) * k] for i in range(b)])
        self.note({"negative_score": float(own.mean())})
        mined_rows = [i for i in range(b) if batch["query_ids"][i]]  # rows DHNM may manage, DHNM on or off
        if mined_rows:
            self.note({"negative_score_mined_queries": float(own[mined_rows].mean())})
        dhnm = batch["dhnm"]
        if dhnm["rows"] and not self.cfg.dhnm.rescore_every:
            self.pool.report([batch["query_ids"][i] for i in dhnm["rows"]], dhnm["negative_ids"],
                             [own[i].tolist() for i in dhnm["rows"]])
        return own

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


def task_of(group: str) -> str:
    """The supervised task of a batch group ("retrieval/de" → "retrieval")."""
    return group.split("/")[0]


def to_device(batch, device: torch.device):
    """Move every tensor of a (nested) batch to the device."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def _tokens(batch: dict) -> int:
    """Non-padding tokens in every padded group of a batch."""
    return sum(int(v["attention_mask"].sum()) for v in batch.values() if isinstance(v, dict) and "attention_mask" in v)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a no-grad tensor from every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


STAGES: dict[str, type[Stage]] = {s.name: s for s in (PretrainStage, SFTStage, WeakStage, SupervisedStage)}


def stage_class(name: str) -> type[Stage]:
    """The Stage class for a stage name."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return STAGES[name]


def export_path(cfg: JobConfig) -> Path:
    """Where the stage's final Hugging Face model directory goes."""
    return Path(cfg.output_dir) / "model"
