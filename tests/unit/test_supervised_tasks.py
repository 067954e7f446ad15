"""Supervised tasks are plug-ins: the stage routes each step's rows to its task's collate and loss (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conan.config import JobConfig, load_config
from conan.data.shards import convert, merge_manifests
from conan.losses import matryoshka_loss
from conan.model import ConanForEmbedding
from conan.train.batching import pad_batch
from conan.train.stages import SupervisedStage
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

    def collate(self, stage, rows):
        return {"pair": pad_batch(stage.encode([r["s1"] for r in rows] + [r["s2"] for r in rows]), stage.pad_id),
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


def supervised_stage(tmp_path, tokenizer, weights: dict, rows: list[dict]) -> SupervisedStage:
    """The stage over these rows, prepared as a worker prepares it (single process)."""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    cfg = load_config(JobConfig, "jobs/configs/supervised_tiny.yaml", [
        "dhnm.enabled=false", f"supervised.task_weights={weights}", "supervised.num_negatives=1",
        "supervised.batch_sizes={retrieval: 4, cosine_regression: 4}", "train.steps=20"])
    manifest = convert([str(tmp_path / "rows.parquet")], tmp_path / "shards", "tasks", SupervisedStage.row_spec(cfg))
    stage = SupervisedStage(cfg, tokenizer)
    stage.prepare(merge_manifests([manifest]), manifest.stats)
    return stage


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
    assert "similarity" in SupervisedStage.row_spec(stage.cfg).columns  # the new column, read from the registry


def test_an_unregistered_task_is_refused_naming_the_known_ones(tmp_path, small_tokenizer):
    """A task name with rows and a weight but no registry entry stops the stage before it trains."""
    with pytest.raises(ValueError, match=r"unknown supervised tasks \['ranking'\].*'retrieval'"):
        supervised_stage(tmp_path, small_tokenizer, {"retrieval": 1.0, "ranking": 1.0},
                         task_rows("retrieval", 8) + task_rows("ranking", 8))



def test_the_shipped_tasks_read_the_columns_in_the_order_shards_were_written_with():
    """Shard files, their hashes and so checkpoints' data positions depend on the column order: the plug-in registry
    keeps the order the supervised stage always read (required columns, then defaulted ones)."""
    from conan.config import JobConfig, load_config

    spec = SupervisedStage.row_spec(load_config(JobConfig, "jobs/configs/supervised_tiny.yaml"))
    assert spec.columns == ("task", "query", "positive", "negatives", "s1", "s2", "score", "query_id", "positive_id",
                            "positive_key", "negative_keys", "lang")
    assert spec.group_by == ("task", "lang") and spec.aliases == {"lang": "doc_lang"}
