"""Make an exported embedding model directory loadable by sentence-transformers and transformers, offline.

The directory the embedding stages export already holds the weights, the tokenizer, `config.json` with an
`auto_map` and the model's source files (so `AutoModel.from_pretrained(path, trust_remote_code=True)` works
without Conan installed; with `import conan` no remote code is needed). This adds sentence-transformers'
module files: Transformer (the Conan decoder) → Pooling (the model's pooling) → Normalize, so
`SentenceTransformer(path, truncate_dim=d)` reproduces the platform's Matryoshka embeddings.

`export_llama` writes the decoder as a stock `LlamaForCausalLM` directory: the architecture is Llama's (RMSNorm,
rotary positions with the same half-split rotation, SwiGLU, GQA, no biases, tied embeddings) and so are the
parameter names, so the weights carry over unchanged and the causal logits agree.
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
    # local_files_only: else its model card looks the directory's last two path parts up on the Hub as a repo.
    model = SentenceTransformer(modules=[encoder, Pooling(config.hidden_size, ST_POOLING[config.pooling]), Normalize()],
                                device="cpu", similarity_fn_name="cosine", local_files_only=True)
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


def export_llama(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Conan model directory (any stage's export) as a LlamaForCausalLM directory that transformers and vLLM
    load with no custom code: weights, config and tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conan.encoder import check_model_dir
    from conan.model import ConanConfig, ConanForCausalLM
    from conan.tokenizer import CHAT_TEMPLATE, load_tokenizer

    model_dir, out_dir = check_model_dir(model_dir), Path(out_dir)
    c = ConanConfig.from_pretrained(str(model_dir))
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                         max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                         tie_word_embeddings=True, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
                         eos_token_id=c.eos_token_id)
    llama = LlamaForCausalLM(config)
    conan = ConanForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
    missing, unexpected = llama.load_state_dict(conan.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embeddings in both
        raise ValueError(f"{model_dir}: weights do not map onto Llama (missing {missing}, unexpected {unexpected})")
    llama.tie_weights()
    llama.save_pretrained(str(out_dir))
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE  # chat APIs (vLLM's LLM.chat) prompt it in the SFT format
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
