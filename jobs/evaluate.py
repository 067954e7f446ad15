"""The evaluation job: `python jobs/evaluate.py --config jobs/configs/eval_tiny.yaml [--set key=value ...]`."""

from _entry import run

if __name__ == "__main__":
    run("evaluate")
