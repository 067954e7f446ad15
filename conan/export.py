"""Make an exported embedding model directory loadable by sentence-transformers and transformers, offline.

The directory the embedding stages export already holds the weights, the tokenizer, `config.json` with an
`auto_map` and the model's source files (so `AutoModel.from_pretrained(path, trust_remote_code=True)` works
without Conan installed; with `import conan` no remote code is needed). This adds sentence-transformers'
module files: Transformer (the Conan decoder) → Pooling (the model's pooling) → Normalize, so
`SentenceTransformer(path, truncate_dim=d)` reproduces the platform's Matryoshka embeddings.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

ST_POOLING = {"mean": "mean", "last": "lasttoken"}


def add_sentence_transformers_files(model_dir: str | Path) -> Path:
    """Write modules.json, sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/, 2_Normalize/."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    from conan.model import ConanConfig

    model_dir = Path(model_dir)
    config = ConanConfig.from_pretrained(str(model_dir))
    encoder = Transformer(str(model_dir), max_seq_length=config.max_seq_length or config.max_position_embeddings)
    model = SentenceTransformer(modules=[encoder, Pooling(config.hidden_size, ST_POOLING[config.pooling]), Normalize()],
                                device="cpu", similarity_fn_name="cosine")
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        # Only sentence-transformers' own files: the weights, config and tokenizer stay as the stage wrote them.
        for item in Path(tmp).iterdir():
            target = model_dir / item.name
            if target.exists():
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, target)
    if config.max_seq_length:  # sentence-transformers takes its max_seq_length from the tokenizer's model_max_length
        path = model_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text())
        tokenizer_config["model_max_length"] = config.max_seq_length
        path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    return model_dir
