"""Custom Ray metrics (Prometheus: ray_conan_*) of training and the data steps, for the Ray Dashboard and Grafana.

Rank 0 sets one gauge per reported figure, tagged with the job name and stage; the DHNM pool actors
export their own counters (conan.dhnm).
"""

from __future__ import annotations

TRAIN_GAUGES = ("step", "loss", "lr", "alpha", "samples_per_s", "tokens_per_s", "step_time_s", "negative_score",
                "reader_cache_mb", "reader_row_group_reads")


class TrainMetrics:
    """Gauges conan_train_<figure>{job, stage} updated at every report."""

    def __init__(self, job: str, stage: str):
        from ray.util.metrics import Gauge

        self.tags = {"job": job, "stage": stage}
        self.gauges = {key: Gauge(f"conan_train_{key}", f"training {key.replace('_', ' ')} (last report)",
                                  tag_keys=("job", "stage")) for key in TRAIN_GAUGES}

    def record(self, metrics: dict) -> None:
        """Set the gauges present in a step report."""
        for key, gauge in self.gauges.items():
            if key in metrics:
                gauge.set(float(metrics[key]), tags=self.tags)


_COUNTERS: dict = {}


def data_rows_counter():
    """Counter conan_data_rows{job, step, outcome}: rows a data step kept ("kept") or rejected (the reason)."""
    if "rows" not in _COUNTERS:
        from ray.util.metrics import Counter
        _COUNTERS["rows"] = Counter("conan_data_rows", "rows out of a data step, by outcome (kept or reject reason)",
                                    tag_keys=("job", "step", "outcome"))
    return _COUNTERS["rows"]


def translation_failures_counter():
    """Counter conan_translation_failures{backend, reason}: failed translation attempts, retried ones included."""
    if "translation" not in _COUNTERS:
        from ray.util.metrics import Counter
        _COUNTERS["translation"] = Counter("conan_translation_failures", "failed translation attempts",
                                           tag_keys=("backend", "reason"))
    return _COUNTERS["translation"]
