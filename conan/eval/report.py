"""The evaluation report: a markdown file with the score tables and three plots.

- scores by Matryoshka dimension (one line per task),
- the model beside the baseline model and BM25 at full size,
- a 2-D map (PCA) of Tatoeba sentences and their translations coloured by language, like the
  paper's Figure 3: a language-agnostic space puts translations together instead of by language.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conan.data.public_sets import tatoeba_lines
from conan.eval.tasks import DATA_SOURCES

MAP_LANGS = ("deu", "fra", "spa", "rus", "cmn", "ara", "jpn", "hin")
MAP_SENTENCES = 150


def main_metric(result: dict, label: str, task: str, dim: str) -> float | None:
    """Mean over subsets of the task's main metric for a model at a dim (None when not scored)."""
    from conan.eval.runner import MAIN_METRIC

    metric = MAIN_METRIC[result["tasks"][task]]
    by_subset = result["scores"].get(label, {}).get(task)
    if not by_subset:
        return None
    values = [s[dim][metric] for s in by_subset.values() if dim in s]
    return float(np.mean(values)) if values else None


def markdown_table(header: list[str], rows: list[list], digits: int = 2) -> str:
    """A markdown table: floats with `digits` decimals, None as "–", anything else as text."""
    def cell(x):
        return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]) + "\n"


def difference_cell(d: dict) -> str:
    """A difference and its interval as a report cell, with its verdict."""
    from conan.eval.runner import verdict

    return f"{d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {verdict(d)}"


def language_groups(result: dict, label: str | None = None) -> dict[str, float]:
    """The columns of the paper's Tables 4 and 12 for a model (default: the evaluated one): the mean main metric at its
    largest dim over English subsets (Eng), Chinese subsets (Zh) and every other language or language pair (Multi)."""
    from conan.eval.runner import MAIN_METRIC, largest_dim

    label = label or result["model"]
    groups: dict[str, list[float]] = {"Multi": [], "Eng": [], "Zh": []}
    for task, by_subset in result["scores"][label].items():
        for subset, by_dim in by_subset.items():
            group = {"en": "Eng", "zh": "Zh"}.get(subset, "Multi")
            groups[group].append(by_dim[largest_dim(by_dim)][MAIN_METRIC[result["tasks"][task]]])
    return {group: float(np.mean(values)) if values else float("nan") for group, values in groups.items()}


def _full(result: dict, label: str, task: str) -> str | None:
    from conan.eval.runner import largest_dim

    by_subset = result["scores"].get(label, {}).get(task)
    return largest_dim(next(iter(by_subset.values()))) if by_subset else None


def write_report(result: dict, out: Path, encoder, cfg) -> Path:
    """Write report.md (and the plots unless encoder is None); returns the report's path."""
    from conan.eval.runner import MAIN_METRIC

    main, dims = result["model"], [str(d) for d in result["dims"]]
    others = [label for label in result["scores"] if label != main]
    lines = [f"# Evaluation of {main}", "", f"Model: `{cfg.model_dir}`" + "".join(f" · baseline: `{b}`"
                                                                                  for b in cfg.baselines), "",
             "Main metric per task (mean over its languages / language pairs): retrieval nDCG@10, STS Spearman, "
             "classification accuracy, bitext mining accuracy. Every model reads at most "
             f"{result.get('max_length')} tokens of a text (the evaluated model's training length).", ""]
    rows = [[task, MAIN_METRIC[kind], *(main_metric(result, main, task, d) for d in dims),
             *(main_metric(result, o, task, _full(result, o, task) or "") for o in others)]
            for task, kind in result["tasks"].items()]
    lines += markdown_table(["task", "metric", *(f"{main} @{d}" for d in dims), *others], rows, 4).splitlines()
    differences = result.get("differences", {})
    if differences:
        lines += ["", "## Differences from the baseline models", "",
                  f"{main} at {dims[-1]} dims minus each baseline model, main metric, with the 95 % interval of a "
                  "paired bootstrap (each subset's items drawn with replacement 1,000 times, the same items for both "
                  "models): *better* or *worse* when the interval excludes 0, *within noise* when it holds 0.", ""]
        lines += markdown_table(["task", *(f"vs {b}" for b in differences)], [
            [task, *(difference_cell(differences[b][task]) for b in differences)] for task in result["tasks"]],
        ).splitlines()
    lines += ["", "## Data", "", *markdown_table(["task", "items scored"], [
        [task, DATA_SOURCES.get(task, f"BEIR folder {task.removeprefix('beir:')}")] for task in result["tasks"]],
    ).splitlines()]
    lines += ["", f"## Per language at {dims[-1]} dims", ""]
    for task, by_subset in result["scores"][main].items():
        metric_names = list(next(iter(by_subset.values()))[dims[-1]])
        rows = [[s, *(v[dims[-1]][m] for m in metric_names)] for s, v in by_subset.items()]
        lines += [f"### {task}", "", *markdown_table(["subset", *metric_names], rows, 4).splitlines(), ""]
    if encoder is not None:
        lines += ["## Plots", "", "![score by Matryoshka dimension](mrl_dims.png)", "",
                  "![model vs baselines](comparison.png)", "", "![embedding map](embedding_map.png)", ""]
        plot_dims(result, out / "mrl_dims.png")
        plot_comparison(result, out / "comparison.png")
        plot_embedding_map(encoder, Path(cfg.data_root), out / "embedding_map.png")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_dims(result: dict, path: Path) -> None:
    """Main metric against Matryoshka dimension, one line per task."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    dims = [str(d) for d in result["dims"]]
    for task in result["tasks"]:
        ax.plot([int(d) for d in dims], [main_metric(result, result["model"], task, d) for d in dims], marker="o",
                label=task)
    ax.set(xlabel="Matryoshka dimension", ylabel="main metric", title=f"{result['model']}: score by dimension")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(result: dict, path: Path) -> None:
    """Grouped bars: the model at full size, the baseline model and BM25, per task."""
    plt = _pyplot()
    labels, task_names = list(result["scores"]), list(result["tasks"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(task_names)), 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [main_metric(result, label, t, _full(result, label, t) or "") for t in task_names]
        ax.bar(np.arange(len(task_names)) + i * width, [v or 0 for v in values], width, label=label)
    ax.set_xticks(np.arange(len(task_names)) + 0.4 - width / 2, task_names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="main metric", title="model vs baselines")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_embedding_map(encoder, root: Path, path: Path) -> None:
    """PCA of English Tatoeba dev sentences and their translations, coloured by language (paper Figure 3)."""
    plt = _pyplot()
    texts, langs = [], []
    for lang in MAP_LANGS:
        src = root / "tatoeba" / f"tatoeba.{lang}-eng.{lang}"
        if src.is_file():
            lines = tatoeba_lines(src, "dev")[:MAP_SENTENCES]
            texts += lines
            langs += [lang] * len(lines)
            if "eng" not in langs:
                eng = tatoeba_lines(src.with_suffix(".eng"), "dev")[:MAP_SENTENCES]
                texts += eng
                langs += ["eng"] * len(eng)
    emb = encoder.encode(texts)
    centred = emb - emb.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6, 5))
    for lang in dict.fromkeys(langs):
        rows = [i for i, x in enumerate(langs) if x == lang]
        ax.scatter(xy[rows, 0], xy[rows, 1], s=6, alpha=0.6, label=lang)
    ax.set(title="Tatoeba sentences by language (PCA of embeddings)", xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
