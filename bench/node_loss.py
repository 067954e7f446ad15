"""Node loss on one machine: a multi-node Ray cluster (ray.cluster_utils.Cluster: a head, two CPU nodes, a spare, two
nodes that only hold DHNM pool shards) runs a short supervised stage with DHNM three times: undisturbed, with the node
of a training worker killed mid-stage (Ray Train restarts the workers elsewhere), and with the node of the pool shard
killed mid-stage (Ray restarts it on the other pool node from its mined arrays; it refuses to serve until the
checkpoint's pool state is loaded into it). Both disturbed runs must resume from the step-4 checkpoint and end with
the undisturbed run's weights and pool state, bit for bit. Its own cluster: run it with no other Ray on the machine
busy (about 4 minutes on 2 cores).

    python bench/node_loss.py [--data-root ../shared/data]

Last line: `node_loss worker_node_same_model=<bool> worker_node_same_pool=<bool> pool_node_same_model=<bool>
pool_node_same_pool=<bool> killed_at=<step>,<step> seconds=<…>`; the report is in <work>/node_loss.json.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from safetensors.numpy import load_file

from conan.config import JobConfig, load_config
from conan.train.checkpoint import load_state
from conan.train.launcher import run_stage

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "supervised_tiny.yaml"
STEPS, KILL_AFTER = 16, 6  # a node dies once the stage has reported step 6 or later, after its step-4 checkpoint


def stage_config(out: Path, data_root: str, model: str, *overrides: str) -> JobConfig:
    """40 English XQuAD queries, DHNM over the whole corpus with the tests' scaled rule, 2 workers, a checkpoint
    every 4 steps; pool shards only on nodes with the dhnm_pool resource."""
    return load_config(JobConfig, CONFIG, [
        f"output_dir={out}", f"data.root={data_root}", f"model.init_from={model}", "supervised.max_per_task=40",
        "supervised.retrieval_langs=[en]", "supervised.task_weights={retrieval: 1.0}", "supervised.batch_sizes={"
        "retrieval: 8}", f"train.steps={STEPS}", "train.log_every=2", "train.checkpoint_every=4",
        "train.num_workers=2", "train.cpus_per_worker=0.9", "train.max_failures=2", "dhnm.enabled=true",
        "dhnm.pool_size=179", "dhnm.decay_factor=1.01", "dhnm.stale_max=0.99", "dhnm.pool_resources={dhnm_pool: 0.5}",
        *overrides])


def reported_step(out: Path) -> int:
    """The last step the run reported."""
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def node_of(class_name: str, head: str) -> str:
    """Node id of a live actor of this class off the head (the state API can lag a new actor by a moment)."""
    for _ in range(100):
        found = [a for a in list_actors(limit=10_000) if a.class_name.endswith(class_name)]
        nodes = [a.node_id for a in found if a.state == "ALIVE" and a.node_id != head]
        if nodes:
            return nodes[0]
        time.sleep(0.3)
    raise RuntimeError(f"no live {class_name} off the head: {[(a.class_name, a.state) for a in list_actors()]}")


def run_and_kill(cluster: Cluster, cfg: JobConfig, victim: str | None) -> dict:
    """Run the stage; with a victim actor class, kill the node holding one of its actors (never the head) once the
    stage has reported step KILL_AFTER."""
    done: dict = {}

    def run() -> None:
        try:
            done["result"] = run_stage(cfg)
        except Exception as e:  # the report says so; the test shows it
            done["error"] = repr(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed = None
    while victim and killed is None and thread.is_alive():
        if reported_step(Path(cfg.output_dir)) >= KILL_AFTER:
            node_id = node_of(victim, cluster.head_node.node_id)
            node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
            cluster.remove_node(node, allow_graceful=False)
            killed = {"node": node_id, "at_step": reported_step(Path(cfg.output_dir))}
        time.sleep(0.2)
    thread.join()
    return {"killed": killed, "finished": "result" in done, "error": done.get("error")}


def random_model(out: Path, data_root: Path) -> Path:
    """A random-init tiny embedding model with a 1,024-token BPE trained on real Tatoeba text (no download)."""
    from conan.data.public_sets import tatoeba_lines
    from conan.export import add_sentence_transformers_files
    from conan.model import ConanConfig, ConanForEmbedding
    from conan.tokenizer import train_tokenizer_from_iterator

    texts = [line for code in ("deu", "fra") for side in (code, "eng")
             for line in tatoeba_lines(data_root / "tatoeba" / f"tatoeba.{code}-eng.{side}", "train")[:500]]
    tokenizer = train_tokenizer_from_iterator(texts, 1024)
    torch.manual_seed(0)
    model = ConanForEmbedding(ConanConfig.from_preset("tiny", vocab_size=len(tokenizer), attention_mode="bidirectional"))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return add_sentence_transformers_files(out)


def main() -> None:
    """Three runs on a fresh multi-node cluster, then what they ended with against the undisturbed run."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="node-loss-"))
    model = str(random_model(work / "model", Path(args.data_root)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
    cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)  # the spare: where a killed worker's work goes
    for _ in range(2):
        cluster.add_node(num_cpus=0, resources={"dhnm_pool": 1}, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    report = {"clean": run_and_kill(cluster, stage_config(work / "clean", args.data_root, model), None)}
    if not report["clean"]["finished"]:
        raise SystemExit(f"the undisturbed run failed: {report['clean']['error']}")
    mined = f"dhnm.candidates={work / 'clean' / 'mined_negatives.parquet'}"
    for name, victim in (("worker_node", "RayTrainWorker"), ("pool_node", "NegativePool")):
        report[name] = run_and_kill(cluster, stage_config(work / name, args.data_root, model, mined), victim)
    ray.shutdown()
    cluster.shutdown()
    clean_weights = load_file(work / "clean" / "model" / "model.safetensors")
    clean_pool = load_state(work / "clean" / "stage_state.pt")["dhnm"]
    for name in ("worker_node", "pool_node"):
        run = report[name]
        if not run["finished"]:
            run.update(same_model=False, same_pool=False)
            continue
        weights = load_file(work / name / "model" / "model.safetensors")
        pool = load_state(work / name / "stage_state.pt")["dhnm"]
        run["max_weight_diff"] = max(float(np.abs(weights[k] - clean_weights[k]).max()) for k in weights)
        run["same_model"] = run["max_weight_diff"] == 0.0
        run["same_pool"] = all(a["counters"] == b["counters"] and all(
            np.array_equal(a[k], b[k], equal_nan=True) for k in ("keys", "candidates", "active", "s0", "si"))
            for a, b in zip(pool, clean_pool))
        run["replacements"] = sum(p["counters"]["replacements"] for p in pool)
        steps = [json.loads(line)["step"] for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        run["replayed_steps"] = sorted({s for s in steps if steps.count(s) > 1})  # reported again after the resume
    (work / "node_loss.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"work dir: {work}")
    print(f"node_loss worker_node_same_model={report['worker_node']['same_model']} "
          f"worker_node_same_pool={report['worker_node']['same_pool']} "
          f"pool_node_same_model={report['pool_node']['same_model']} "
          f"pool_node_same_pool={report['pool_node']['same_pool']} "
          f"killed_at={report['worker_node']['killed'] and report['worker_node']['killed']['at_step']},"
          f"{report['pool_node']['killed'] and report['pool_node']['killed']['at_step']} "
          f"seconds={time.perf_counter() - began:.0f}")


if __name__ == "__main__":
    main()
