"""Joining Ray: a cluster address when given, else a local Ray started in-process."""

from __future__ import annotations

import os

# Ray Train V2 blocks ~2 s in every ray.train.report() at the default health-check interval.
RAY_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(address: str | None = None, num_cpus: int | None = None, metrics_export_port: int | None = None):
    """Connect to `address` (or $RAY_ADDRESS), or start a local Ray; a no-op (returning None) when already connected,
    else Ray's context (its dashboard_url is where `ray job submit` goes).

    A local Ray exports Prometheus metrics on `metrics_export_port` (or $CONAN_METRICS_EXPORT_PORT) when given,
    reported every second instead of Ray's default ten.
    """
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # one line per stage, not a bar per block
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return ray.init(address=address, log_to_driver=True)
    else:
        port = metrics_export_port or os.environ.get("CONAN_METRICS_EXPORT_PORT")
        metrics = {"_metrics_export_port": int(port), "_system_config": {"metrics_report_interval_ms": 1000}} if port else {}
        return ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True,
                        runtime_env={"env_vars": dict(RAY_ENV_DEFAULTS)}, **metrics)
