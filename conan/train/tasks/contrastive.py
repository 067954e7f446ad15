"""Retrieval, CLR and classification: InfoNCE (eq. 1) of each query against the global batch's positives and hard
negatives, Matryoshka over dims, copies of a row's positive masked; DHNM swaps in the pool's negatives."""

from __future__ import annotations

import pyarrow as pa
import torch

from conan.data.dedup import content_keys
from conan.losses import gather_with_grad, infonce_loss, matryoshka_loss, positive_copies_mask
from conan.train.batching import gather_detached
from conan.train.diagnostics import contrastive_stats
from conan.train.tasks.base import SupervisedTask

EMPTY_SLOT = -(2**63)  # the mask key of a negative slot a row cannot fill (no content key takes it: 2⁻⁶⁴ odds)


class ContrastiveTask(SupervisedTask):
    """(query, positive, negatives) rows. A passage is identified by its key (positive_key / negative_keys: a passage
    id) or else its text; in a mined task, a row with a query_id may have its negatives managed by the DHNM pool (ids
    into dhnm.passages)."""

    columns = ("query", "positive", "negatives", "query_id", "positive_id", "positive_key", "negative_keys")
    defaults = {"query_id": "", "positive_id": -1, "positive_key": "", "negative_keys": []}
    required = ("query", "positive")  # (query, positive) pairs are rows too: their negatives' slots are masked

    def token_columns(self, table, encoder):
        """query_ids, positive_ids, negatives_ids (a row's list), the passages' mask keys (the 64-bit content key of
        positive_key / negative_keys where a row names them, else of the text) and query_id."""
        positives, negatives = table["positive"].to_pylist(), table["negatives"].to_pylist()
        negative_keys = [[key or text for key, text in zip(keys or [""] * len(texts), texts)]
                         for keys, texts in zip(table["negative_keys"].to_pylist(), negatives)]
        return {"query_ids": encoder.ids(table["query"].to_pylist()), "positive_ids": encoder.ids(positives),
                "negatives_ids": encoder.nested(negatives),
                "positive_mask_key": pa.array(content_keys([key or text for key, text in
                                                            zip(table["positive_key"].to_pylist(), positives)])),
                "negative_mask_keys": pa.array([content_keys(keys) for keys in negative_keys], pa.list_(pa.int64())),
                "query_id": table["query_id"]}

    def collate(self, stage, rows):
        """Queries; passages = every row's positive, then every row's k negatives (the pool's where it manages the
        row); their mask keys; which rows the pool manages and with which candidate ids. A row with fewer than k
        negatives (a user's pairs, a query with few mined candidates) fills its slots with a one-token placeholder
        keyed EMPTY_SLOT, which the loss masks for every query: every rank keeps b + b·k passages in row order."""
        k = stage.cfg.supervised.num_negatives
        negatives = [r["negatives_ids"][:k] for r in rows]
        negative_keys = [r["negative_mask_keys"][:k] for r in rows]
        candidates = self.pool_rows(stage, rows)
        assigned = stage.pool.assign([rows[i]["query_id"] for i in candidates]) if candidates else []
        managed = [i for i, ids in zip(candidates, assigned) if ids is not None]
        negative_ids = [ids for ids in assigned if ids is not None]
        for i, ids in zip(managed, negative_ids):
            negatives[i], negative_keys[i] = stage.passages.take_tokens(ids)
        passages = [r["positive_ids"] for r in rows] + [n for negs in negatives
                                                         for n in [*negs, *[[stage.pad_id]] * (k - len(negs))]]
        keys = [r["positive_mask_key"] for r in rows] + [key for keys in negative_keys
                                                          for key in [*keys, *[EMPTY_SLOT] * (k - len(keys))]]
        return {"query": stage.text_batch([r["query_ids"] for r in rows]),
                "passage": stage.text_batch(passages),
                "passage_keys": torch.tensor(keys, dtype=torch.int64),
                "query_ids": [r["query_id"] for r in rows],
                "dhnm": {"rows": managed, "negative_ids": negative_ids}}

    def loss(self, stage, engine, batch, dims):
        """InfoNCE at every dim; the figures of the largest dim (cosines, own negatives) go to the report and the
        own negatives' cosines to the DHNM pool, read off the loss's scores."""
        queries = engine(**batch["query"], raw=True)
        local_passages = engine(**batch["passage"], raw=True)
        passages = gather_with_grad(local_passages)
        b, per_rank = len(queries), len(local_passages)  # b positives then b*k negatives on every rank
        target = torch.arange(b, device=queries.device) + stage.rank * per_rank
        # Another copy of a row's positive (the paragraph of another question, the same question in another
        # language, a repeated label) is no negative of that row.
        keys = gather_detached(batch["passage_keys"])
        allowed = positive_copies_mask(keys, target) & (keys != EMPTY_SLOT)[None, :]
        loss, per_dim = matryoshka_loss(infonce_loss, (queries, passages), dims, target,
                                        stage.cfg.loss.temperature, allowed)
        scores = per_dim[max(per_dim)][1]
        own = self.track_negatives(stage, scores, batch, stage.rank * per_rank)
        stage.note({**{f"infonce_loss_d{d}": float(v[0].detach()) for d, v in per_dim.items()},
                    **contrastive_stats(scores, target, allowed, local_passages[:b], own)}, f"{self.name}_")
        return loss

    def track_negatives(self, stage, scores: torch.Tensor, batch: dict, base: int) -> torch.Tensor:
        """Read each query's own-negative cosines (b, k) off the loss's similarity matrix (no extra forward pass);
        report them to the DHNM pool for the rows it manages."""
        b, k = len(batch["query_ids"]), stage.cfg.supervised.num_negatives
        own = torch.stack([scores[i, base + b + i * k: base + b + (i + 1) * k] for i in range(b)])
        filled = (batch["passage_keys"][b:] != EMPTY_SLOT).view(b, k).to(own.device)
        own = own.masked_fill(~filled, float("nan"))  # empty slots: no cosine to average or report
        stage.note({"negative_score": float(own.nanmean())})
        mined_rows = [i for i in range(b) if batch["query_ids"][i]]  # rows DHNM may manage, DHNM on or off
        if mined_rows:
            stage.note({"negative_score_mined_queries": float(own[mined_rows].nanmean())})
        dhnm = batch["dhnm"]
        if dhnm["rows"] and not stage.cfg.dhnm.rescore_every:
            stage.pool.report([batch["query_ids"][i] for i in dhnm["rows"]], dhnm["negative_ids"],
                              [own[i, :len(ids)].tolist() for i, ids in zip(dhnm["rows"], dhnm["negative_ids"])])
        return own
