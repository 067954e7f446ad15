"""The shape every supervised task has: the columns its rows need, how a micro-batch of them is collated, its loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import torch

from conan.data.tokenize import TokenEncoder

if TYPE_CHECKING:  # the stage hands itself to its tasks; typing only, no import cycle
    from conan.train.stages import SupervisedStage


class SupervisedTask:
    """One task of the supervised stage (sentence-transformers' losses/ shape: one file, one call shape).

    Upstream, `token_columns` turns the task's text rows into token columns. The stage draws a task per step from the
    seed (supervised.task_weights), reads that many rows of the task's token shards (supervised.batch_sizes[name]) and
    hands them to `collate`, then the collated batch to `loss`. The stage gives access to what tasks share: the config,
    the pad id, the rank, `note` for report figures, the DHNM pool and its passages' token ids."""

    name: str
    columns: tuple[str, ...] = ()  # columns its rows need beside task and lang
    defaults: dict[str, object] = {}  # … of which a file may lack these (an input file can mix tasks)
    required: tuple[str, ...] | None = None  # the columns each of its rows must hold (None: those without a default)

    def __init__(self, name: str, mined: bool = False):
        """mined: its rows with a query_id get hard negatives mined for them, and DHNM manages those."""
        self.name, self.mined = name, mined

    def needs(self) -> tuple[str, ...]:
        """The columns a row of this task must hold (a value, and text that is not blank); a row without one of them
        is rejected when the input is sharded."""
        return self.required if self.required is not None else tuple(c for c in self.columns if c not in self.defaults)

    def token_columns(self, table: pa.Table, encoder: TokenEncoder) -> dict[str, pa.Array]:
        """The token shard columns of a text shard file of this task's rows (tokenized upstream, on a Ray Data actor
        pool: the rows `collate` gets)."""
        raise NotImplementedError

    def pool_rows(self, stage: SupervisedStage, rows: list[dict]) -> list[int]:
        """Positions of the rows whose negatives the DHNM pool may manage: a mined task's rows with a query_id."""
        if not (self.mined and stage.pool is not None):
            return []
        return [i for i, r in enumerate(rows) if r.get("query_id")]

    def collate(self, stage: SupervisedStage, rows: list[dict]) -> dict:
        """Tensors (and ids) of one micro-batch of this task's rows."""
        raise NotImplementedError

    def loss(self, stage: SupervisedStage, engine, batch: dict, dims: list[int]) -> torch.Tensor:
        """The micro-batch's loss, Matryoshka-summed over dims; figures for the report go to stage.note."""
        raise NotImplementedError
