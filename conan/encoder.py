"""The platform's own text encoder: an exported Conan embedding model + its tokenizer, batched inference.

Mining, evaluation and serving all embed through this class, in forward passes that pack their texts into one
unpadded row (no padding to compute; attention per group of like lengths). Mining and evaluation agree to the last bit
(`encode`: the texts sorted by length, `batch_size` a pass), the server's passes (`encode_packed`: the texts as they
arrive) with them to float rounding (~1e-7), as does `SentenceTransformer(path)` (padded batches) on the same
directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conan.tokenizer import encode_texts, load_tokenizer, token_ids


def check_model_dir(model_dir: str | Path) -> Path:
    """The model directory, or a FileNotFoundError that names it and what writes one."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no exported model here (no config.json); `make demo` writes every stage's "
                                "as runs/pipeline_tiny/<stage>/model, `conan train <stage>` writes <output_dir>/model")
    return path


def model_name(model_dir: str | Path, name: str | None = None) -> str:
    """A model's display / served name: `name` when given, else its directory's (the stage's for .../model)."""
    path = Path(model_dir).resolve()
    return name or (path.parent.name if path.name == "model" else path.name)


class Encoder:
    """Encodes texts into unit-norm (optionally Matryoshka-truncated) float32 vectors."""

    # Texts tokenized and sorted together: passes as full as a global sort (256 passes of 64), and a block's token
    # ids as Python lists stay ~100 MB at 200 tokens a text (all of 1M texts' would be ~7 GB).
    SORT_BLOCK = 16_384

    def __init__(self, model_dir: str | Path, device: str = "cpu", max_length: int | None = None,
                 batch_size: int = 32, keep_freed_heap_mb: int = 512):
        """On CPU the process's malloc then keeps up to keep_freed_heap_mb of freed memory for the next forward pass
        (conan.heap: faulting activations back in cost offline encoding ~20 %); 0 changes nothing."""
        from conan.heap import keep_freed_heap
        from conan.model import ConanForEmbedding

        if device == "cpu":
            keep_freed_heap(keep_freed_heap_mb * 1024 * 1024)  # before the model's first allocations
        self.model = ConanForEmbedding.from_pretrained(str(check_model_dir(model_dir)),
                                                       use_safetensors=True).to(device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        # A fast tokenizer must not be used from two threads at once ("Already borrowed"): the server's batcher
        # counts and encodes in its worker thread, but a caller may count on its own thread meanwhile (usage checks,
        # the serving bench), so counting has its own instance.
        self.counting_tokenizer = load_tokenizer(model_dir)
        self.device, self.batch_size = device, batch_size
        config = self.model.config
        self.max_length = max_length or config.max_seq_length or config.max_position_embeddings
        self.dims = list(self.model.config.matryoshka_dims or []) or [self.model.config.hidden_size]

    @property
    def dimension(self) -> int:
        """Full embedding size."""
        return self.model.config.hidden_size

    def check_dim(self, dim: int | None) -> None:
        """ValueError unless dim is None or a size the model can truncate to (1 … hidden size)."""
        if dim is not None and not 0 < dim <= self.dimension:
            raise ValueError(f"dimensions must be between 1 and {self.dimension}, got {dim}")

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text, special tokens included, before truncation (what usage reports)."""
        return [len(x) for x in token_ids(self.counting_tokenizer, texts)]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, cut at max_length."""
        return encode_texts(self.tokenizer, texts, self.max_length)

    def encode(self, texts: list[str], dim: int | None = None) -> np.ndarray:
        """(len(texts), dim or hidden) float32 in input order: each block of SORT_BLOCK texts tokenized, sorted by
        token count and run `batch_size` a packed pass (~1.3x the texts/s of padded batches of like lengths: tiny
        model, 2 cores). Token ids live one block at a time, so a corpus of millions holds only its vectors."""
        self.check_dim(dim)
        out = np.zeros((len(texts), dim or self.dimension), dtype=np.float32)
        for first in range(0, len(texts), self.SORT_BLOCK):
            ids = self.token_ids(texts[first:first + self.SORT_BLOCK])
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                out[[first + i for i in idx]] = self.packed_pass([ids[i] for i in idx], dim)
        return out

    def encode_packed(self, texts: list[str], dim: int | None = None) -> np.ndarray:
        """encode's vectors (to float rounding) from one forward pass over the texts in the given order (the server's
        passes)."""
        self.check_dim(dim)
        return self.packed_pass(self.token_ids(texts), dim)

    @torch.no_grad()
    def packed_pass(self, ids: list[list[int]], dim: int | None) -> np.ndarray:
        """One forward pass over token id lists packed into one unpadded row: projections and MLP see no padding
        whatever the mix of lengths; attention runs per text, padded to the longest of its group of like lengths
        (attention.length_groups)."""
        if not ids:
            return np.zeros((0, dim or self.dimension), dtype=np.float32)
        from conan.model.attention import pack_texts

        row, documents = pack_texts(ids)
        return self.model(row.to(self.device), dim=dim, documents=documents.to(self.device)).float().cpu().numpy()


class SentenceTransformerEncoder:
    """Any sentence-transformers or Hugging Face model directory behind Encoder's `encode` (unit-norm float32)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True,
                                         model_kwargs={"use_safetensors": True})  # never unpickle weights
        self.batch_size = batch_size

    def encode(self, texts: list[str], dim: int | None = None) -> np.ndarray:
        """(len(texts), dim or full) unit-norm float32 embeddings."""
        out = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                truncate_dim=dim, show_progress_bar=False)
        return out.astype(np.float32)


def open_encoder(model_dir: str | Path, device: str = "cpu", max_length: int | None = None, batch_size: int = 32):
    """The platform's Encoder for a Conan export, else sentence-transformers over the directory (any HF model)."""
    import json

    config = Path(model_dir) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "conan":
        return Encoder(model_dir, device=device, max_length=max_length, batch_size=batch_size)
    return SentenceTransformerEncoder(model_dir, device=device, batch_size=batch_size)
