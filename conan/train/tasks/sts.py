"""STS: sentence pairs with a gold similarity, CoSENT (eq. 2) over the global batch, Matryoshka over dims."""

from __future__ import annotations

import torch

from conan.losses import cosent_loss, gather_with_grad, matryoshka_loss
from conan.train.batching import gather_detached
from conan.train.tasks.base import SupervisedTask


class STSTask(SupervisedTask):
    """(s1, s2, score) rows: predicted pair cosines are asked to rank like the gold scores."""

    columns = ("s1", "s2", "score")
    defaults = {"s1": "", "s2": "", "score": 0.0}  # for a file's rows of other tasks
    required = ("s1", "s2", "score")  # a pair without a gold score trained as 0.0

    def token_columns(self, table, encoder):
        """s1_ids, s2_ids and the gold score."""
        return {"s1_ids": encoder.ids(table["s1"].to_pylist()), "s2_ids": encoder.ids(table["s2"].to_pylist()),
                "score": table["score"]}

    def collate(self, stage, rows):
        """Both sides in one forward pass's batch (s1s then s2s) and the gold scores."""
        return {"pair": stage.text_batch([r["s1_ids"] for r in rows] + [r["s2_ids"] for r in rows]),
                "score": torch.tensor([r["score"] for r in rows], dtype=torch.float32)}

    def loss(self, stage, engine, batch, dims):
        """CoSENT of the gathered pairs at every dim."""
        b = len(batch["score"])
        raw = engine(**batch["pair"], raw=True)
        left, right = gather_with_grad(raw[:b]), gather_with_grad(raw[b:])
        loss, per_dim = matryoshka_loss(cosent_loss, (left, right), dims, gather_detached(batch["score"]),
                                        stage.cfg.loss.cosent_scale)
        stage.note({f"cosent_loss_d{d}": float(v[0].detach()) for d, v in per_dim.items()}, f"{self.name}_")
        return loss
