"""ConanConfig: the decoder's hyper-parameters, with the paper's 1.4B preset and a tiny one."""

from __future__ import annotations

from transformers import PretrainedConfig

# Paper §4.2: 8 layers, hidden 3584, 32 heads / 8 KV heads (GQA), FFN 8192, vocab 150k, 32k context.
PRESETS: dict[str, dict] = {
    "conan-1.4b": dict(vocab_size=150_000, hidden_size=3584, num_hidden_layers=8,
                       num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                       max_position_embeddings=32_768,
                       matryoshka_dims=[256, 512, 1024, 1536, 2048, 3072, 3584]),
    # The size of the small sentence encoders people serve (6 layers × 384, ~22M parameters with a 32k vocabulary;
    # the SwiGLU FFN of 1024 costs what a 1536 GELU FFN does): the serving benchmark's realistic model.
    "small-20m": dict(vocab_size=32_000, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=512,
                      matryoshka_dims=[64, 128, 256, 384]),
    # Mid-size (8 layers × 512, ~42M parameters): matmuls wide enough to measure a device's MFU on (bench/mfu.py).
    "medium-40m": dict(vocab_size=32_000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=1536, max_position_embeddings=2048,
                       matryoshka_dims=[64, 128, 256, 512]),
    # Small enough to train on 2 CPU cores in seconds, large enough to learn something.
    "tiny": dict(vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, max_position_embeddings=512,
                 matryoshka_dims=[32, 64, 128]),
}


class ConanConfig(PretrainedConfig):
    """Configuration of the Conan decoder (Llama-style: RMSNorm, RoPE, SwiGLU, GQA, tied embeddings)."""

    model_type = "conan"

    def __init__(self, vocab_size: int = 8192, hidden_size: int = 128, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2,
                 intermediate_size: int = 256, max_position_embeddings: int = 512,
                 rope_theta: float = 10_000.0, rms_norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, attention_backend: str = "auto",
                 pooling: str = "mean", matryoshka_dims: list[int] | None = None,
                 attention_mode: str = "causal", max_seq_length: int | None = None,
                 pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                 tie_word_embeddings: bool = True, **kwargs):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {num_key_value_heads}")
        if attention_backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention_backend must be 'auto', 'sdpa' or 'flex', got {attention_backend!r}")
        if attention_mode not in ("causal", "bidirectional"):
            raise ValueError(f"attention_mode must be 'causal' or 'bidirectional', got {attention_mode!r}")
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        # auto: compiled FlexAttention for the soft mask on CUDA, SDPA otherwise (attention.attention_kernel).
        self.attention_backend = attention_backend
        self.pooling = pooling
        # The mask ConanModel uses when a caller (e.g. AutoModel in sentence-transformers) names none;
        # embedding exports set it to bidirectional.
        self.attention_mode = attention_mode
        # Tokens per text the embedding stages trained at: encoders truncate there unless told otherwise (longer
        # texts than the model ever saw make worse embeddings, not better ones). None = max_position_embeddings.
        self.max_seq_length = max_seq_length
        self.matryoshka_dims = list(matryoshka_dims) if matryoshka_dims else [hidden_size]
        bad = [d for d in self.matryoshka_dims if not 0 < d <= hidden_size]
        if bad:
            raise ValueError(f"matryoshka_dims {bad} are outside (0, hidden_size={hidden_size}]")
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ConanConfig":
        """Build a config from a named preset, with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
