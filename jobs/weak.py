"""The weak job: `python jobs/weak.py --config jobs/configs/weak_tiny.yaml [--set key=value ...]`.

Under Ray: `ray job submit --working-dir . -- python jobs/weak.py --config jobs/configs/weak_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("train", "weak")
