"""The pretrain job: `python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml [--set key=value ...]`.

Under Ray: `ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("train", "pretrain")
