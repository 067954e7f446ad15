"""The four training stages on one loop: each says what it reads, how it batches and what it minimises.

pretrain  causal LM on packed token blocks (documents joined by <|eos|>)
sft       causal LM on (instruction, input, output), loss on the output tokens only
weak      InfoNCE with in-batch negatives over the global batch, soft mask scheduled over the stage
supervised task-homogeneous batches: retrieval / clr / classification (InfoNCE with hard negatives),
          sts (CoSENT), every loss wrapped in Matryoshka over the configured dims

Batches are a pure function of (seed, micro-batch index, rank), so a resumed run sees exactly the
data an uninterrupted one would.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from conan.config import JobConfig
from conan.data import stage_data
from conan.losses import cosent_loss, gather_with_grad, infonce_loss, matryoshka_loss
from conan.model import ConanForCausalLM, ConanForEmbedding
from conan.model.soft_mask import soft_mask_alpha
from conan.tokenizer import INPUT, INSTRUCTION, OUTPUT


class EpochSampler:
    """Index batches over a shard: a fresh seeded permutation every epoch, no state to save."""

    def __init__(self, size: int, seed: int):
        if size == 0:
            raise ValueError("a worker's data shard is empty; use fewer workers or more data")
        self.size, self.seed = size, seed

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def batch(self, index: int, batch_size: int) -> list[int]:
        """Row indices of the index-th batch of batch_size rows (epochs wrap)."""
        start = index * batch_size
        return [int(self._permutation(g // self.size)[g % self.size]) for g in range(start, start + batch_size)]


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
    aliases: dict[str, str] = {}  # column → another record kind's column that stands in for it
    defaults: dict[str, object] = {}  # columns a file may lack

    def __init__(self, cfg: JobConfig, tokenizer, rank: int = 0, world_size: int = 1):
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size
        self.seq_len = cfg.data.seq_len

    @staticmethod
    def records(cfg: JobConfig) -> list[dict]:
        """The stage's rows from the real datasets under cfg.data.root."""
        raise NotImplementedError

    def prepare(self, rows: list[dict]) -> None:
        """Tokenize this worker's shard once."""
        raise NotImplementedError

    def batch(self, index: int) -> dict:
        """The index-th micro-batch of this worker."""
        raise NotImplementedError

    def loss(self, engine, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch and its counters (samples, tokens, …)."""
        raise NotImplementedError

    def metrics(self) -> dict:
        """Stage-specific figures for the step report (e.g. DHNM counters)."""
        return {}

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
    """Causal LM on packed token streams."""

    name, model_class, columns = "pretrain", ConanForCausalLM, ("text",)

    @staticmethod
    def records(cfg):
        return stage_data.pretrain_records(cfg.data.root, cfg.data.max_rows)

    def prepare(self, rows):
        stream = [t for ids in self.tokenizer([r["text"] for r in rows])["input_ids"] for t in ids]
        n = len(stream) // self.seq_len
        self.blocks = torch.tensor(stream[:n * self.seq_len], dtype=torch.long).view(n, self.seq_len)
        self.sampler = EpochSampler(n, self.cfg.train.seed + self.rank)

    def batch(self, index):
        ids = self.blocks[self.sampler.batch(index, self.cfg.train.micro_batch_size)]
        return {"input_ids": ids, "labels": ids}

    def loss(self, engine, batch, step):
        out = engine(input_ids=batch["input_ids"], labels=batch["labels"])
        return out.loss, {"samples": len(batch["input_ids"]), "tokens": batch["input_ids"].numel()}


class SFTStage(Stage):
    """Causal LM on instruction / input / output, loss on the output tokens only."""

    name, model_class, columns = "sft", ConanForCausalLM, ("instruction", "input", "output")

    @staticmethod
    def records(cfg):
        return stage_data.pair_records(cfg.data.root, cfg.data.max_rows, cfg.train.seed)

    def prepare(self, rows):
        tok = self.tokenizer
        prompts = tok([f"{INSTRUCTION}{r['instruction']}{INPUT}{r['input']}{OUTPUT}" for r in rows],
                      add_special_tokens=False)["input_ids"]
        outputs = tok([r["output"] for r in rows])["input_ids"]  # ends with <|eos|>
        self.examples = []
        for p, o in zip(prompts, outputs):
            p = p[:self.seq_len // 2]  # keep room for the answer
            o = o[:self.seq_len - len(p)]
            self.examples.append((p + o, [-100] * len(p) + o))
        self.sampler = EpochSampler(len(self.examples), self.cfg.train.seed + self.rank)

    def batch(self, index):
        chosen = [self.examples[i] for i in self.sampler.batch(index, self.cfg.train.micro_batch_size)]
        return pad_batch([c[0] for c in chosen], self.tokenizer.pad_token_id, [c[1] for c in chosen])

    def loss(self, engine, batch, step):
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {"samples": len(batch["input_ids"]), "tokens": int(batch["attention_mask"].sum())}


class WeakStage(Stage):
    """InfoNCE on (instruction + input, output) pairs with in-batch negatives and the soft mask."""

    name, model_class, columns = "weak", ConanForEmbedding, ("instruction", "input", "output")
    # Curated weak pairs (conan curate): the query already holds instruction + input.
    aliases, defaults = {"input": "query", "output": "positive"}, {"instruction": ""}

    records = SFTStage.records

    def prepare(self, rows):
        self.queries = self.encode([f"{INSTRUCTION}{r['instruction']}{INPUT}{r['input']}" for r in rows])
        self.passages = self.encode([r["output"] for r in rows])
        self.sampler = EpochSampler(len(rows), self.cfg.train.seed + self.rank)

    def batch(self, index):
        chosen = self.sampler.batch(index, self.cfg.train.micro_batch_size)
        pad = self.tokenizer.pad_token_id
        return {"query": pad_batch([self.queries[i] for i in chosen], pad),
                "passage": pad_batch([self.passages[i] for i in chosen], pad)}

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
        loss, _ = infonce_loss(queries, gather_with_grad(passages), target, self.cfg.loss.temperature)
        return loss, {"samples": b, "tokens": _tokens(batch), "alpha": alpha}


class SupervisedStage(Stage):
    """Multi-task contrastive training: one task per step (the same on every worker), MRL over dims."""

    name, model_class = "supervised", ConanForEmbedding
    columns = ("task", "query", "positive", "negatives", "s1", "s2", "score", "query_id", "positive_id")
    # Retrieval / CLR triples (conan clr) lack the STS columns and passage ids.
    defaults = {"s1": "", "s2": "", "score": 0.0, "query_id": "", "positive_id": -1}
    PAIR_TASKS = ("retrieval", "clr", "classification")
    RESCORE_CHUNK = 16  # queries per extra forward pass of the v1 re-scoring baseline

    def __init__(self, cfg, tokenizer, rank=0, world_size=1, pool_names: list[str] | None = None):
        super().__init__(cfg, tokenizer, rank, world_size)
        self.pool = None
        if pool_names:
            from conan.dhnm import NegativePoolClient
            self.pool = NegativePoolClient.connect(pool_names)
        self.negative_scores: list[float] = []  # mean own-negative cosine per step, all pair rows
        self.mined_query_scores: list[float] = []  # the same over rows that have a query_id
        self.rescored_step = -1

    @staticmethod
    def records(cfg):
        rows = stage_data.supervised_records(cfg.data.root, cfg.supervised.num_negatives,
                                             cfg.supervised.max_per_task, cfg.train.seed)
        if cfg.supervised.clr_paths:  # a built CLR set replaces the built-in human-translation CLR rows
            from conan.train.launcher import read_rows
            clr = read_rows(cfg.supervised.clr_paths, SupervisedStage, "supervised.clr_paths")
            rows = [r for r in rows if r["task"] != "clr"] + stage_data.with_passage_ids(
                clr[:cfg.supervised.max_per_task], cfg.data.root)
        return rows

    def prepare(self, rows):
        sup = self.cfg.supervised
        by_task: dict[str, list[dict]] = {}
        for r in rows:
            by_task.setdefault(r["task"], []).append(r)
        self.tasks = sorted(t for t in by_task if sup.task_weights.get(t, 0) > 0)
        if not self.tasks:  # e.g. `--set supervised.task_weights.clr=0` replaces the whole mapping
            raise ValueError(f"supervised.task_weights {dict(sup.task_weights)}: none of the tasks with rows "
                             f"{sorted(by_task)} has a positive weight")
        unknown = set(self.tasks) - set(self.PAIR_TASKS) - {"sts"}
        if unknown:
            raise ValueError(f"unknown supervised tasks {sorted(unknown)}")
        self.rows = {t: by_task[t] for t in self.tasks}
        self.samplers = {t: EpochSampler(len(self.rows[t]), self.cfg.train.seed + self.rank) for t in self.tasks}
        # The task of every micro-batch, from the seed alone, so all workers agree.
        weights = np.array([sup.task_weights[t] for t in self.tasks], dtype=float)
        total = self.cfg.train.steps * self.cfg.train.grad_accum
        picks = np.random.default_rng([self.cfg.train.seed, 7]).choice(len(self.tasks), total, p=weights / weights.sum())
        self.schedule = [self.tasks[i] for i in picks]
        seen: dict[str, int] = {}
        self.occurrence = []  # how many earlier micro-batches had the same task
        for task in self.schedule:
            self.occurrence.append(seen.get(task, 0))
            seen[task] = seen.get(task, 0) + 1
        self.dims = self.cfg.loss.matryoshka_dims
        if self.pool is not None:  # passages the pool's candidate ids point at
            self.corpus = stage_data.xquad_corpus(self.cfg.data.root)

    def batch(self, index):
        task, occurrence = self.schedule[index], self.occurrence[index]
        size = self.cfg.supervised.batch_sizes[task]
        chosen = [self.rows[task][i] for i in self.samplers[task].batch(occurrence, size)]
        pad = self.tokenizer.pad_token_id
        if task == "sts":
            return {"task": task, "size": size,
                    "pair": pad_batch(self.encode([r["s1"] for r in chosen] + [r["s2"] for r in chosen]), pad),
                    "score": torch.tensor([r["score"] for r in chosen], dtype=torch.float32)}
        k = self.cfg.supervised.num_negatives
        negatives = [r["negatives"][:k] for r in chosen]
        candidates = [i for i, r in enumerate(chosen) if self.pool is not None and r.get("query_id")]
        assigned = self.pool.assign([chosen[i]["query_id"] for i in candidates]) if candidates else []
        managed = [i for i, ids in zip(candidates, assigned) if ids is not None]
        negative_ids = [ids for ids in assigned if ids is not None]
        for i, ids in zip(managed, negative_ids):
            negatives[i] = [self.corpus[j] for j in ids]
        passages = [r["positive"] for r in chosen] + [n for negs in negatives for n in negs]
        return {"task": task, "size": size, "query": pad_batch(self.encode([r["query"] for r in chosen]), pad),
                "passage": pad_batch(self.encode(passages), pad),
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
            loss, _ = matryoshka_loss(cosent_loss, (left, right), dims, gold, self.cfg.loss.cosent_scale)
            return loss, counters
        queries = engine(**batch["query"], raw=True)
        local_passages = engine(**batch["passage"], raw=True)
        passages = gather_with_grad(local_passages)
        per_rank = len(local_passages)  # b positives then b*k negatives on every rank
        target = torch.arange(b, device=queries.device) + self.rank * per_rank
        mask = None
        if task == "classification":  # other rows' labels may be this row's label: own candidates only
            k = self.cfg.supervised.num_negatives
            mask = torch.zeros(b, passages.shape[0], dtype=torch.bool, device=queries.device)
            base = self.rank * per_rank
            for i in range(b):
                mask[i, base + i] = True
                mask[i, base + b + i * k: base + b + (i + 1) * k] = True
        loss, per_dim = matryoshka_loss(infonce_loss, (queries, passages), dims, target,
                                        self.cfg.loss.temperature, mask)
        self._track_negatives(per_dim[max(per_dim)][1], batch, self.rank * per_rank)
        every = self.cfg.dhnm.rescore_every
        if self.pool is not None and every and step % every == 0 and step != self.rescored_step:
            self.rescored_step = step
            self._rescore(engine.module)
        return loss, counters

    def _rescore(self, model) -> None:
        """The v1 baseline (dhnm.rescore_every = K): every K steps an extra no-grad forward pass over every managed
        query of this worker and its active negatives; those scores go to the pool instead of the loss's."""
        rows = [r for t in ("retrieval", "clr") for r in self.rows.get(t, ()) if r.get("query_id")]
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

    def _track_negatives(self, scores: torch.Tensor, batch: dict, base: int) -> None:
        """Read each query's own-negative cosines off the loss's similarity matrix (no extra forward pass);
        report them to the DHNM pool for the rows it manages."""
        b, k = batch["size"], self.cfg.supervised.num_negatives
        own = torch.stack([scores[i, base + b + i * k: base + b + (i + 1) * k] for i in range(b)])
        self.negative_scores.append(float(own.mean()))
        mined_rows = [i for i in range(b) if batch["query_ids"][i]]  # rows DHNM may manage, DHNM on or off
        if mined_rows:
            self.mined_query_scores.append(float(own[mined_rows].mean()))
        dhnm = batch["dhnm"]
        if dhnm["rows"] and not self.cfg.dhnm.rescore_every:
            self.pool.report([batch["query_ids"][i] for i in dhnm["rows"]], dhnm["negative_ids"],
                             [own[i].tolist() for i in dhnm["rows"]])

    def metrics(self) -> dict:
        """Mean own-negative cosine since the last report, and the pool's counters."""
        out = {}
        for key, values in (("negative_score", self.negative_scores),
                            ("negative_score_mined_queries", self.mined_query_scores)):
            if values:
                out[key] = sum(values) / len(values)
                values.clear()
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
