"""Building a stage's model: from the previous stage's export, or fresh from a preset."""

from __future__ import annotations

from pathlib import Path

from conan.config import ConfigError, ModelSpec
from conan.model.configuration import ConanConfig


def preset_config(name: str, **overrides) -> ConanConfig:
    """ConanConfig.from_preset with its complaints (an unknown preset, heads that do not divide) as a ConfigError, one
    line from the CLI: configuration.py ships inside every export, which loads without Conan, so it cannot raise
    conan.config's errors itself."""
    try:
        return ConanConfig.from_preset(name, **overrides)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err


def model_config_for(spec: ModelSpec, tokenizer) -> ConanConfig:
    """The preset with overrides, its vocabulary and special ids taken from the tokenizer."""
    return preset_config(spec.preset, **{
        **spec.overrides, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})


def load_or_init(model_class, spec: ModelSpec, tokenizer):
    """`model_class` loaded from spec.init_from (any Conan head's export), else randomly initialised, in training
    mode; with spec.activation_checkpointing its layers recompute their activations in the backward pass."""
    if spec.init_from:
        path = Path(spec.init_from)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.init_from: no exported model at {path}")
        model = model_class.from_pretrained(str(path), use_safetensors=True)  # never unpickle weights
    else:
        model = model_class(model_config_for(spec, tokenizer))
    if spec.activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    # from_pretrained returns a model in eval mode, where the layers skip activation checkpointing and the LM head
    # makes the logits a training step does not use.
    return model.train()
