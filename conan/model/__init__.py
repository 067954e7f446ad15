"""The Conan decoder and its heads, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conan.model.configuration import PRESETS, ConanConfig
from conan.model.modeling import (ConanForCausalLM, ConanForEmbedding, ConanModel,
                                  count_parameters)

AutoConfig.register("conan", ConanConfig, exist_ok=True)
AutoModel.register(ConanConfig, ConanModel, exist_ok=True)
AutoModelForCausalLM.register(ConanConfig, ConanForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "ConanConfig", "ConanModel", "ConanForCausalLM", "ConanForEmbedding",
           "count_parameters"]
