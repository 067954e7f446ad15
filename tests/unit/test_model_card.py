"""The model card of an embedding export: Hugging Face front matter that parses, dev results in model-index."""

from __future__ import annotations

import torch
import yaml

from conan.config import BUNDLED_DATA, JobConfig, to_dict
from conan.model import ConanConfig, ConanForEmbedding
from conan.model_card import write_model_card


def test_card_front_matter_and_model_index(tmp_path):
    model_dir = tmp_path / "supervised" / "model"
    torch.manual_seed(0)
    ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=300)).save_pretrained(str(model_dir))
    config = to_dict(JobConfig(stage="supervised"))
    config["data"]["root"] = str(BUNDLED_DATA)  # as the demo and the pipeline run
    result = {"tasks": {"xquad-retrieval": "retrieval", "stsb": "sts"},
              "scores": {"supervised": {"xquad-retrieval": {"en": {"32": {"ndcg@10": 0.2}, "128": {"ndcg@10": 0.4123456}},
                                                            "de": {"128": {"ndcg@10": 0.3}}},
                                        "stsb": {"en": {"128": {"spearman": 0.55}}}},
                         "model_init": {"stsb": {"en": {"128": {"spearman": 0.5}}}}}}
    card = write_model_card(model_dir, config, result, "supervised").read_text()
    _, front, body = card.split("---\n", 2)
    front = yaml.safe_load(front)
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "sentence-similarity"
    assert "en" in front["language"] and "zh" in front["language"]  # the bundled sets' languages
    [index] = front["model-index"]
    assert index["name"] == "supervised"
    values = {(r["dataset"]["name"], r["dataset"]["config"], r["metrics"][0]["type"]): r["metrics"][0]["value"]
              for r in index["results"]}
    assert values == {("stsb", "en", "spearman"): 0.55, ("xquad-retrieval", "de", "ndcg_at_10"): 0.3,
                      ("xquad-retrieval", "en", "ndcg_at_10"): 0.4123}  # the full dim only; no baseline's
    assert "XQuAD: CC BY-SA 4.0" in body and "stage: supervised" in body and "[32, 64, 128]" in body
    # Without results (at export time): no model-index; a user's data, not the bundled sets.
    config["data"].update(paths=["s3://bucket/pairs/"], root="/data/mine")
    card = write_model_card(model_dir, config).read_text()
    front = yaml.safe_load(card.split("---\n", 2)[1])
    assert "model-index" not in front and front["language"] == ["multilingual"]
    assert "s3://bucket/pairs/" in card and "XQuAD" not in card


def test_a_users_files_are_not_called_the_bundled_sets(tmp_path):
    """data.root keeps its default (the bundled sets) when a user names their own files: the card lists those files
    and no bundled licence; the demo's and the pipeline's inputs, written inside the run, are the bundled sets. The
    card names the export's pooling."""
    model_dir = tmp_path / "run" / "supervised" / "model"
    ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=300, pooling="last")).save_pretrained(str(model_dir))
    config = to_dict(JobConfig(stage="supervised", output_dir=str(tmp_path / "run" / "supervised")))
    config["data"].update(root=str(BUNDLED_DATA), paths=[str(tmp_path / "company" / "pairs.parquet")])
    card = write_model_card(model_dir, config).read_text()
    assert yaml.safe_load(card.split("---\n", 2)[1])["language"] == ["multilingual"]
    assert "pairs.parquet" in card and "XQuAD" not in card and "last token" in card
    config["data"]["paths"] = [str(tmp_path / "run" / "curated" / "data")]  # the pipeline's curation step
    assert "XQuAD: CC BY-SA 4.0" in write_model_card(model_dir, config).read_text()
