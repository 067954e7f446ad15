"""Session fixtures: one Ray head started by cluster/local.sh, the real data root, a tokenizer trained on real text."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["RAY_AUTH_MODE"] = "token"  # `ray start --head` turns token auth on; drivers and `ray job submit` need it


@pytest.fixture(scope="session")
def data_root() -> Path:
    """$CONAN_DATA_ROOT or ../shared/data; its absence is an error, not a skip: the tests run on real data."""
    root = Path(os.environ.get("CONAN_DATA_ROOT", REPO.parent / "shared" / "data"))
    assert (root / "tatoeba").is_dir(), f"real datasets missing at {root} (set CONAN_DATA_ROOT)"
    return root


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()
HEAD_DIR = tempfile.mkdtemp(prefix="conan-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray head for the whole session, started and stopped by cluster/local.sh as a user would: 2 CPUs like CI,
    Prometheus metrics on METRICS_PORT, its own ports and temp dir (other local clusters are left alone).
    Yields the driver's Ray context; its dashboard_url is where `ray job submit` goes."""
    import ray

    from conan.runtime import init_ray

    gcs_port = free_port()
    env = {**os.environ, "CONAN_RAY_DIR": HEAD_DIR,
           "CONAN_RAY_PORT": str(gcs_port), "CONAN_DASHBOARD_PORT": str(free_port()),
           "CONAN_METRICS_PORT": str(METRICS_PORT), "CONAN_CLIENT_PORT": str(free_port()),
           "CONAN_AGENT_PORT": str(free_port()), "CONAN_NUM_CPUS": "2", "RAY": str(Path(sys.executable).parent / "ray")}
    local_sh = [str(REPO / "cluster" / "local.sh")]
    up = subprocess.run([*local_sh, "up"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    try:
        yield init_ray(f"127.0.0.1:{gcs_port}")
    finally:
        ray.shutdown()
        subprocess.run([*local_sh, "down"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(HEAD_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def head_env(ray_cluster) -> dict[str, str]:
    """The exports cluster/local.sh wrote for the session's head (RAY_ADDRESS, RAY_AUTH_MODE, CONAN_RUNTIME_ENV, …)."""
    import shlex

    lines = (Path(HEAD_DIR) / "cluster.env").read_text().splitlines()
    return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)


@pytest.fixture(scope="session")
def scrape_metrics(ray_cluster):
    """Returns the sample lines of the Prometheus endpoint whose metric name starts with a prefix."""
    import urllib.request

    def scrape(prefix: str) -> list[str]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
        return [line for line in text.splitlines() if line.startswith(prefix)]
    return scrape


class MetricsRecorder:
    """Scrapes the head's Prometheus endpoint every second in a thread and keeps each `ray_conan_` series' last line:
    a gauge leaves the endpoint ~2 s after the worker that set it exits, so a test reads what was served while the
    run lived, as a Prometheus server scraping the head would have stored it."""

    def __init__(self, scrape):
        import threading

        self._scrape, self._series, self._stop = scrape, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for line in self._scrape("ray_conan_"):
                self._series[line.rsplit(" ", 1)[0]] = line

    def lines(self, prefix: str) -> list[str]:
        """The last line of every recorded series whose metric name starts with `prefix`."""
        return [line for line in list(self._series.values()) if line.startswith(prefix)]

    def stop(self) -> None:
        """Ends the scraping thread."""
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def metrics_recorder(scrape_metrics):
    """A MetricsRecorder running for the module's tests (start a run after requesting it)."""
    recorder = MetricsRecorder(scrape_metrics)
    yield recorder
    recorder.stop()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, data_root) -> Path:
    """The multilingual corpus (Tatoeba + XQuAD), written once."""
    from conan.data.corpus import write_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    write_corpus(data_root, path, sources=["tatoeba", "xquad"])
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, ray_cluster, corpus) -> Path:
    """A 4k byte-level BPE trained through Ray Data on the corpus."""
    from conan.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(corpus)], out, vocab_size=4096)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The session tokenizer, loaded from disk."""
    from conan.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def embedding_model_dir(tmp_path_factory, tokenizer):
    """A randomly initialised tiny embedding model exported like the embedding stages export (ST files too)."""
    import torch

    from conan.export import add_sentence_transformers_files
    from conan.model import ConanConfig, ConanForEmbedding

    out = tmp_path_factory.mktemp("embedding_model") / "model"
    torch.manual_seed(0)
    model = ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=len(tokenizer), attention_mode="bidirectional"))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return add_sentence_transformers_files(out)
