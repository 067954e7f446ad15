"""Supervised tasks as plug-ins: each names its columns, collates a micro-batch of its rows and computes its loss
(conan.train.tasks.base.SupervisedTask); the supervised stage draws a task per step and hands it the rows.

A new task = one file with a SupervisedTask subclass plus its entry in TASKS; rows name it in their `task` column, and
supervised.task_weights / batch_sizes give its share of the steps and its batch size."""

from __future__ import annotations

from conan.train.tasks.base import SupervisedTask
from conan.train.tasks.contrastive import ContrastiveTask
from conan.train.tasks.sts import STSTask

TASKS: dict[str, SupervisedTask] = {t.name: t for t in (
    STSTask("sts"), ContrastiveTask("retrieval", mined=True), ContrastiveTask("clr", mined=True),
    ContrastiveTask("classification"))}


__all__ = ["TASKS", "ContrastiveTask", "STSTask", "SupervisedTask"]
