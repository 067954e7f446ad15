"""The weak-pair curation job: `python jobs/curate_weak.py --config jobs/configs/curate_tiny.yaml [--set key=value]`.

Under Ray: `ray job submit --working-dir . -- python jobs/curate_weak.py --config jobs/configs/curate_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("curate")
