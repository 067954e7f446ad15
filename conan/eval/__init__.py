"""Evaluation of exported embedding models (and a BM25 baseline) on local data: tasks, metrics, report."""
