"""The model card every embedding export carries: README.md with Hugging Face front matter.

Front matter: library_name, pipeline_tag, tags, languages, licence and, once the pipeline has evaluated the model,
a `model-index` with the dev results (each task's main metric at the full dimension, per language). The body says
how to load it (sentence-transformers, transformers, the OpenAI-compatible server), how it was trained (stage,
steps, config) and from which data, with the licences of the bundled sets when it trained on the demo data.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# The bundled sets' licences (conan/data/bundled/ATTRIBUTION.md) and the languages the embedding stages train on
# from them (XQuAD's 12, STS-B multi-MT's 10, CSL, Banking77; pretraining also reads Tatoeba's 112).
DEMO_LANGUAGES = ["en", "zh", "ar", "de", "el", "es", "hi", "ro", "ru", "th", "tr", "vi", "fr", "it", "nl", "pl",
                  "pt"]
DEMO_SOURCES = [("Tatoeba (LASER test sets)", "CC BY 2.0 FR"), ("XQuAD", "CC BY-SA 4.0"),
                ("STS-B multi-MT", "CC BY-SA 4.0"), ("CSL", "Apache-2.0"), ("Banking77", "CC BY 4.0"),
                ("text2vec bge pairs", "Apache-2.0")]
TASK_TYPES = {"retrieval": "Retrieval", "sts": "STS", "classification": "Classification", "bitext": "BitextMining"}


def model_index(name: str, result: dict, model: str) -> list[dict]:
    """HF model-index entries for one evaluated model of a scores.json (`result`): main metric, full dim, per subset."""
    from conan.eval.runner import MAIN_METRIC, largest_dim

    entries = []
    for task, subsets in sorted(result["scores"].get(model, {}).items()):
        kind = result["tasks"][task]
        for subset, by_dim in sorted(subsets.items()):
            dim = largest_dim(by_dim)
            metric = MAIN_METRIC[kind]
            entries.append({"task": {"type": TASK_TYPES[kind]},
                            "dataset": {"name": task, "type": task, "config": subset, "split": "test"},
                            "metrics": [{"type": metric.replace("@", "_at_"), "value": round(by_dim[dim][metric], 4),
                                         "name": f"{metric} (dim {dim})"}]})
    return [{"name": name, "results": entries}]


def write_model_card(model_dir: str | Path, config: dict, result: dict | None = None, model: str | None = None) -> Path:
    """Write <model_dir>/README.md for an embedding export trained with `config` (a JobConfig as a dict); with a
    scores.json `result`, its `model`'s scores go into model-index."""
    from conan.encoder import model_name

    from conan.config import BUNDLED_DATA

    model_dir = Path(model_dir)
    name = model_name(model_dir)
    paths = config.get("data", {}).get("paths") or []
    root = config.get("data", {}).get("root")
    # The demo data source and the pipeline's data steps read the bundled sets (data.root) and write inside the run
    # (beside the stage's output_dir); a user's own files anywhere else came from them (data.root is set either way).
    run = Path(config.get("output_dir") or ".").resolve().parent
    demo = bool(root) and Path(root).resolve() == Path(BUNDLED_DATA).resolve() and all(
        Path(p).resolve().is_relative_to(run) for p in paths)
    front = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
             "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "conan", "matryoshka"],
             "language": DEMO_LANGUAGES if demo else ["multilingual"],
             "license": "other",
             "license_name": "training-data-terms",
             "license_link": "README.md#data"}
    if result is not None:
        front["model-index"] = model_index(name, result, model or name)
    model_config = json.loads((model_dir / "config.json").read_text())
    dims = model_config.get("matryoshka_dims")
    pooling = "take the last token's state" if model_config.get("pooling") == "last" else \
        "mean-pool over the attention mask"
    inputs = "\n".join(f"- `{p}`" for p in paths) or "- the demo data source's rows"
    sources = (f"Inputs:\n\n{inputs}\n\n" + (
        "They come from the datasets bundled with Conan (`conan/data/bundled`):\n\n" +
        "\n".join(f"- {source}: {licence}" for source, licence in DEMO_SOURCES) +
        "\n\nThe weights are trained on these sets; their terms (ShareAlike among them) may bind what you do with "
        "the weights." if demo else "The data's terms are its owner's."))
    body = f"""# {name}

A Conan text-embedding model (Conan-embedding-v2 recipe), stage `{config.get("stage")}`, Matryoshka dims {dims}.

## Usage

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{model_dir}", trust_remote_code=True, truncate_dim={dims[-1] if dims else None})
embeddings = model.encode(["a query", "a passage"], normalize_embeddings=True)
```

transformers: `AutoModel.from_pretrained(path, trust_remote_code=True)` returns token states ({pooling} and
L2-normalise). Served over the OpenAI-compatible API: `conan serve --config
jobs/configs/serve_tiny.yaml --set model_dir={model_dir}`, then `POST /v1/embeddings` with `input` and `dimensions`.

## Training

Stage `{config.get("stage")}`, {config.get("train", {}).get("steps")} steps, starting from
`{config.get("model", {}).get("init_from")}`. The full configuration:

```yaml
{yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip()}
```

## Data

{sources}
"""
    path = model_dir / "README.md"
    path.write_text("---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body)
    return path
