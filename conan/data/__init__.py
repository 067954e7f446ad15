"""Data: readers for the real datasets and Ray Data pipelines."""
