"""Supervised tasks are plug-ins: the stage routes each step's rows to its task's collate and loss; packed texts train
as the padded ones in the supervised and weak stages (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conan.config import JobConfig, load_config
from conan.data.shards import convert, load_manifest, merge_manifests
from conan.losses import matryoshka_loss
from conan.model import ConanForEmbedding
from conan.train.batching import pad_batch
from conan.train.stages import SupervisedStage, WeakStage
from conan.train.tasks import TASKS, SupervisedTask


def cosine_mse(left: torch.Tensor, right: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sentence-transformers' CosineSimilarityLoss in conan.losses' call shape: mean (cos − gold)², the cosines."""
    cos = (left * right).sum(-1)
    return ((cos - gold) ** 2).mean(), cos.detach()


class CosineRegressionTask(SupervisedTask):
    """A task the platform does not ship: (s1, s2, similarity) rows, a column no shipped task has, cosine regressed
    on the similarity."""

    columns = ("s1", "s2", "similarity")
    defaults = {"similarity": 0.0}

    def token_columns(self, table, encoder):
        return {"s1_ids": encoder.ids(table["s1"].to_pylist()), "s2_ids": encoder.ids(table["s2"].to_pylist()),
                "similarity": table["similarity"]}

    def collate(self, stage, rows):
        return {"pair": pad_batch([r["s1_ids"] for r in rows] + [r["s2_ids"] for r in rows], stage.pad_id),
                "gold": torch.tensor([r["similarity"] for r in rows])}

    def loss(self, stage, engine, batch, dims):
        b = len(batch["gold"])
        raw = engine(**batch["pair"], raw=True)
        loss, per_dim = matryoshka_loss(cosine_mse, (raw[:b], raw[b:]), dims, batch["gold"])
        stage.note({f"mse_d{d}": float(v[0].detach()) for d, v in per_dim.items()}, f"{self.name}_")
        return loss


class Engine:
    """What the stage calls: the DeepSpeed engine's forward and its .module."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def task_rows(task: str, n: int) -> list[dict]:
    """n rows of a task with every column a mixed-task file has."""
    return [{"task": task, "query": f"query {i}", "positive": f"passage {i}", "negatives": [f"other {i}"],
             "s1": f"a sentence {i}", "s2": f"another sentence {i}", "score": float(i % 6), "similarity": (i % 6) / 5,
             "lang": "en"} for i in range(n)]


def prepared_stage(stage_class, config: str, tmp_path, tokenizer, rows: list[dict], *overrides: str):
    """A stage over these rows, tokenized upstream and prepared as a worker prepares it (single process)."""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    cfg = load_config(JobConfig, config, ["train.steps=20", *overrides])
    text = convert([str(tmp_path / "rows.parquet")], tmp_path / "shards", stage_class.input_kind,
                   stage_class.row_spec(cfg))
    tokens = load_manifest(stage_class.worker_shards([str(text.directory)], tmp_path / "tokens", cfg,
                                                     str(tmp_path / "tokenizer"))[0])
    assert tokens.group_rows() == text.group_rows()
    stage = stage_class(cfg, tokenizer)
    stage.prepare(merge_manifests([tokens]), tokens.stats)
    return stage


def supervised_stage(tmp_path, tokenizer, weights: dict, rows: list[dict], *overrides: str) -> SupervisedStage:
    """The supervised stage over these rows (prepared_stage), without DHNM."""
    return prepared_stage(SupervisedStage, "jobs/configs/supervised_tiny.yaml", tmp_path, tokenizer, rows,
                          "dhnm.enabled=false", f"supervised.task_weights={weights}", "supervised.num_negatives=1",
                          "supervised.batch_sizes={retrieval: 4, cosine_regression: 4, sts: 4}", *overrides)


def test_a_new_task_is_one_class_and_a_registry_entry(tmp_path, small_tokenizer, small_embedding_model_dir,
                                                      monkeypatch):
    """Rows naming a task registered at run time reach its collate and loss, its new column reaches the rows, and
    the loss is the task's own, by hand."""
    monkeypatch.setitem(TASKS, "cosine_regression", CosineRegressionTask("cosine_regression"))
    stage = supervised_stage(tmp_path, small_tokenizer, {"retrieval": 1.0, "cosine_regression": 1.0},
                             task_rows("retrieval", 40) + task_rows("cosine_regression", 40))
    model = ConanForEmbedding.from_pretrained(str(small_embedding_model_dir))
    seen = set()
    for index in range(12):
        batch = stage.batch(index)
        loss, counters = stage.loss(Engine(model), batch, index)
        seen.add(batch["task"])
        assert counters["samples"] == 4 and batch["task"] in ("retrieval", "cosine_regression")
        if batch["task"] == "cosine_regression":
            with torch.no_grad():
                emb = model(**batch["pair"])  # unit-norm at full size
                expected = sum(((torch.nn.functional.normalize(emb[:4, :d], dim=-1)
                                 * torch.nn.functional.normalize(emb[4:, :d], dim=-1)).sum(-1) - batch["gold"]) ** 2
                               for d in (32, 64, 128)).sum() / 4
            assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert seen == {"retrieval", "cosine_regression"}  # the task of each step is drawn from both
    figures = stage.metrics()
    assert {"cosine_regression_mse_d32", "retrieval_infonce_loss_d32"} <= set(figures)
    assert figures["reader_cache_mb"] > 0 and figures["reader_row_group_reads"] >= 2  # both tasks' files were read
    assert stage.metrics()["reader_row_group_reads"] == 0  # counted since the last report
    assert "similarity" in SupervisedStage.row_spec(stage.cfg).columns  # the new column, read from the registry


def test_rows_of_an_unregistered_task_are_rejected_and_counted(tmp_path, small_tokenizer):
    """Rows naming a task the registry lacks are rejects (`unknown_task`, with their row in the file), not shard
    groups that fail later in tokenization; the registered task's rows train."""
    stage = supervised_stage(tmp_path, small_tokenizer, {"retrieval": 1.0},
                             task_rows("retrieval", 8) + task_rows("ranking", 8))
    stats = load_manifest(tmp_path / "shards").stats
    assert (stats["rows_in"], stats["rejected"], stats["reasons"]) == (16, 8, {"unknown_task": 8})
    rejects = pq.read_table(tmp_path / "shards" / "rejects" / "f00000.parquet").to_pylist()
    assert [r["origin"] for r in rejects] == [f"{tmp_path / 'rows.parquet'}:{i}" for i in range(9, 17)]
    assert all('"task": "ranking"' in r["raw"] for r in rejects)
    assert stage.batch(0)["task"] == "retrieval"



def test_the_shipped_tasks_read_the_columns_in_the_order_shards_were_written_with():
    """Shard files, their hashes and so checkpoints' data positions depend on the column order: the plug-in registry
    keeps the order the supervised stage always read (required columns, then defaulted ones)."""
    from conan.config import JobConfig, load_config

    spec = SupervisedStage.row_spec(load_config(JobConfig, "jobs/configs/supervised_tiny.yaml"))
    assert spec.columns == ("task", "query", "positive", "negatives", "s1", "s2", "score", "query_id", "positive_id",
                            "positive_key", "negative_keys", "lang")
    assert spec.group_by == ("task", "lang") and spec.aliases == {"lang": "doc_lang"}


def test_supervised_rows_are_tokenized_upstream(tmp_path, small_tokenizer, data_root):
    """Workers read ids: a retrieval batch's queries, positives and negatives are their texts' ids (cut at seq_len,
    <|eos|> kept), its mask keys the content keys of the named keys or else the texts; a row the DHNM pool manages gets
    its negatives' ids and keys from the passage lookup; an STS batch holds its sentences' ids and scores."""
    from conan.data.dedup import content_keys
    from conan.data.passages import PassageLookup, write_passage_lookup
    from conan.data.public_sets import tatoeba_lines
    from conan.tokenizer import encode_texts

    lines = tatoeba_lines(data_root / "tatoeba" / "tatoeba.deu-eng.eng", "train")[:200]
    blank = {"query": "", "positive": "", "negatives": [], "query_id": "", "positive_key": "", "negative_keys": [],
             "s1": "", "s2": "", "score": 0.0, "lang": "en"}  # every row has every column (one parquet file)
    rows = [{**blank, "task": "retrieval", "query": lines[i], "positive": lines[50 + i] * (1 + i % 3),
             "negatives": [lines[100 + i], lines[150 + i]], "query_id": f"q{i}" if i % 2 else "",
             "positive_key": "label-a" if i % 4 == 1 else "", "negative_keys": ["label-b", ""] if i % 4 == 1 else []}
            for i in range(40)]
    rows += [{**blank, "task": "sts", "s1": lines[i], "s2": lines[100 + i], "score": float(i % 6)} for i in range(40)]
    stage = supervised_stage(tmp_path, small_tokenizer, {"retrieval": 1.0, "sts": 1.0}, rows, "data.seq_len=12")
    by_text = {(r["task"], r.get("query") or r["s1"]): r for r in rows}
    pq.write_table(pa.table({"text": lines}), tmp_path / "passages.parquet")
    stage.passages = PassageLookup(write_passage_lookup(tmp_path / "passages.parquet", tmp_path / "passages.arrow",
                                                        tmp_path / "tokenizer", 12))

    class Pool:  # what NegativePoolClient.assign answers: passage ids for the queries it manages, None for others
        def assign(self, query_ids):
            return [[int(q[1:]) + 3] if q in ("q1", "q5") else None for q in query_ids]
    stage.pool = Pool()

    def encode(texts):
        return encode_texts(small_tokenizer, texts, 12)

    def unpadded(group):
        """Each text's ids, from a packed row (the shipped config's layout) or a padded batch."""
        if "documents" in group:
            return [ids.tolist() for ids in group["input_ids"][0].split(torch.bincount(group["documents"]).tolist())]
        return [ids[:n].tolist() for ids, n in zip(group["input_ids"], group["attention_mask"].sum(1))]
    seen = set()
    for index in range(12):
        batch = stage.batch(index)
        seen.add(batch["task"])
        if batch["task"] == "sts":
            pairs = unpadded(batch["pair"])
            chosen = [next(r for r in rows if r["task"] == "sts" and encode([r["s1"]])[0] == ids) for ids in pairs[:4]]
            assert pairs == encode([r["s1"] for r in chosen] + [r["s2"] for r in chosen])
            assert batch["score"].tolist() == [r["score"] for r in chosen]
            continue
        queries = unpadded(batch["query"])
        chosen = [next(r for (task, q), r in by_text.items() if task == "retrieval" and encode([q])[0] == ids)
                  for ids in queries]
        negatives = [[lines[int(r["query_id"][1:]) + 3]] if r["query_id"] in ("q1", "q5") else r["negatives"][:1]
                     for r in chosen]
        assert unpadded(batch["passage"]) == encode([r["positive"] for r in chosen] + [n for ns in negatives for n in ns])
        expected_keys = [r["positive_key"] or r["positive"] for r in chosen] + [
            n if r["query_id"] in ("q1", "q5") else ((r["negative_keys"] or [""])[0] or n)
            for r, ns in zip(chosen, negatives) for n in ns]
        assert batch["passage_keys"].tolist() == content_keys(expected_keys).tolist()
        managed = [i for i, r in enumerate(chosen) if r["query_id"] in ("q1", "q5")]
        assert batch["dhnm"]["rows"] == managed
        seen |= {"managed"} if managed else set()
        seen |= {"named keys"} if any(r["positive_key"] for r in chosen) else set()
    assert seen == {"retrieval", "sts", "managed", "named keys"}  # every path was read


def packing_rows(stage: str) -> tuple[list[dict], tuple[str, ...]]:
    """Rows of a stage whose texts differ in length within a batch (so padded batches pad), and its overrides."""
    if stage == "weak":  # soft mask on: alpha = step / 20, from causal (step 0) to half open
        rows = [{"input": f"query {i}", "output": " ".join([f"passage {i}"] * (1 + i % 5)), "lang": "en",
                 "source": "s"} for i in range(40)]
        return rows, ("train.micro_batch_size=4",)
    rows = task_rows("retrieval", 40) + task_rows("sts", 40)
    for i, row in enumerate(rows):
        row["positive"] = " ".join([row["positive"]] * (1 + i % 5))
    return rows, ()


@pytest.mark.parametrize("stage_name", ["supervised", "weak"])
def test_packed_texts_train_as_the_padded_ones(stage_name, tmp_path, small_tokenizer, small_embedding_model_dir):
    """data.pack_texts: each forward pass's texts (weak queries and passages under the soft mask; supervised queries,
    passages, STS pairs) are one unpadded row; the loss, its gradients and the token count equal the padded batch's,
    step by step, to float rounding, and no pad is computed."""
    rows, overrides = packing_rows(stage_name)
    stages = {}
    for layout, flag in (("padded", "false"), ("packed", "true")):
        (tmp_path / layout).mkdir()
        if stage_name == "weak":
            stages[layout] = prepared_stage(WeakStage, "jobs/configs/weak_tiny.yaml", tmp_path / layout,
                                            small_tokenizer, rows, f"data.pack_texts={flag}", *overrides)
        else:
            stages[layout] = supervised_stage(tmp_path / layout, small_tokenizer, {"retrieval": 1.0, "sts": 1.0},
                                              rows, f"data.pack_texts={flag}", *overrides)
    model = ConanForEmbedding.from_pretrained(str(small_embedding_model_dir))
    seen, pads = set(), 0
    for index in range(8):
        figures = {}
        for name, stage in stages.items():
            batch = stage.batch(index)
            groups = [v for v in batch.values() if isinstance(v, dict) and "input_ids" in v]
            if name == "packed":
                assert all(len(g["input_ids"]) == 1 and "attention_mask" not in g for g in groups)
            else:
                pads += sum(int((g["attention_mask"] == 0).sum()) for g in groups)
            model.zero_grad()
            loss, counters = stage.loss(Engine(model), batch, index)
            loss.backward()
            figures[name] = (batch.get("task", stage_name), loss.item(), counters["tokens"],
                             torch.cat([p.grad.flatten() for p in model.parameters()]))
        (task, a, tokens_a, grad_a), (task_b, b, tokens_b, grad_b) = figures["padded"], figures["packed"]
        assert task == task_b and tokens_a == tokens_b and b == pytest.approx(a, rel=1e-5, abs=1e-6)
        assert (grad_b - grad_a).norm() <= 1e-5 * grad_a.norm()
        seen.add(task)
    assert seen == ({"weak"} if stage_name == "weak" else {"retrieval", "sts"}) and pads > 0


def test_rows_with_fewer_negatives_than_k_train_on_the_ones_they_have(tmp_path, small_tokenizer,
                                                                     small_embedding_model_dir):
    """Retrieval rows with 2, 1 or no hard negatives at k = 2 (a user's pairs; a query with few mined candidates):
    every rank still holds b + b·k passages, the empty slots are no candidate of any query, and the loss equals
    InfoNCE over the passages the rows do have."""
    from conan.losses import infonce_loss, positive_copies_mask
    from conan.train.tasks.contrastive import EMPTY_SLOT

    rows = task_rows("retrieval", 24)
    for i, row in enumerate(rows):
        row["negatives"] = [f"other {i} {j}" for j in range(i % 3)]
    stage = supervised_stage(tmp_path, small_tokenizer, {"retrieval": 1.0}, rows, "supervised.num_negatives=2")
    model = ConanForEmbedding.from_pretrained(str(small_embedding_model_dir))
    dims = model.config.matryoshka_dims
    empty_slots = 0
    for index in range(6):
        batch = stage.batch(index)
        b, keys = len(batch["query_ids"]), batch["passage_keys"]
        filled = keys != EMPTY_SLOT
        assert len(keys) == b + 2 * b and bool(filled[:b].all())
        empty_slots += int((~filled).sum())
        loss, _ = stage.loss(Engine(model), batch, index)
        with torch.no_grad():
            queries = model(**batch["query"], raw=True)
            passages = model(**batch["passage"], raw=True)[filled]
        target = torch.arange(b)
        expected, _ = matryoshka_loss(infonce_loss, (queries, passages), dims, target, stage.cfg.loss.temperature,
                                      positive_copies_mask(keys[filled], target))
        assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    figures = stage.metrics()
    assert empty_slots > 0 and all(np.isfinite(figures[f"retrieval_{key}"]) for key in (
        "hard_negative_cos", "negative_cos", "log_candidates"))  # averages of the filled slots, not NaN


def test_rows_of_an_unweighted_task_without_a_batch_size_are_never_drawn(tmp_path, small_tokenizer):
    """A task at weight 0 needs no batch size (the DHNM tests train retrieval alone on rows that hold every task)."""
    rows = task_rows("retrieval", 24) + [{**r, "text": f"utterance {i}", "label": "a"}
                                         for i, r in enumerate(task_rows("classification", 24))]
    stage = supervised_stage(tmp_path, small_tokenizer, {"retrieval": 1.0}, rows)
    assert {stage.batch(i)["task"] for i in range(6)} == {"retrieval"}


def test_a_resume_checks_the_settings_that_order_each_stages_rows():
    """What a checkpoint records beside the seed, world size and data (DataPosition.ordering): the supervised stage's
    task weights (in proportion) and batch sizes, not train.micro_batch_size, which its tasks do not read; a weak
    stage's micro-batch size; every stage's gradient accumulation and reading settings."""
    def ordering(stage_class, config, *overrides):
        return stage_class.ordering(load_config(JobConfig, config, list(overrides)))

    supervised = "jobs/configs/supervised_tiny.yaml"
    base = ordering(SupervisedStage, supervised, "supervised.task_weights={retrieval: 1.0, clr: 1.0}")
    assert base["supervised.task_weights"] == {"clr": 0.5, "retrieval": 0.5}
    assert base == ordering(SupervisedStage, supervised, "supervised.task_weights={retrieval: 2.0, clr: 2.0, sts: 0}",
                            "train.micro_batch_size=3", "train.steps=7")
    for change in ("supervised.task_weights={retrieval: 1.0, clr: 0.5}", "supervised.batch_sizes.clr=5",
                   "train.grad_accum=2", "data.bucket_batches=4"):
        assert ordering(SupervisedStage, supervised, "supervised.task_weights={retrieval: 1.0, clr: 1.0}",
                        change) != base, change
    weak = ordering(WeakStage, "jobs/configs/weak_tiny.yaml")
    assert ordering(WeakStage, "jobs/configs/weak_tiny.yaml", "train.micro_batch_size=3") != weak
    assert ordering(WeakStage, "jobs/configs/weak_tiny.yaml", "train.steps=7", "optim.lr=0.5") == weak
