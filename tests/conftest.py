"""Session fixtures: one local Ray cluster, the real data root, a tokenizer trained on real text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """../shared/data; its absence is an error, not a skip: the tests run on real data."""
    from conan.config import default_data_root

    root = Path(default_data_root())
    assert (root / "tatoeba").is_dir(), f"real datasets missing at {root} (set CONAN_DATA_ROOT)"
    return root


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, 2 CPUs like CI, Prometheus metrics on METRICS_PORT; yields Ray's context."""
    import ray

    from conan.runtime import init_ray

    context = init_ray(num_cpus=2, metrics_export_port=METRICS_PORT)
    yield context
    ray.shutdown()


@pytest.fixture(scope="session")
def scrape_metrics(ray_cluster):
    """Returns the sample lines of the Prometheus endpoint whose metric name starts with a prefix."""
    import urllib.request

    def scrape(prefix: str) -> list[str]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
        return [line for line in text.splitlines() if line.startswith(prefix)]
    return scrape


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
