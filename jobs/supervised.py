"""The supervised job: `python jobs/supervised.py --config jobs/configs/supervised_tiny.yaml [--set key=value ...]`.

Under Ray: `ray job submit --working-dir . -- python jobs/supervised.py --config jobs/configs/supervised_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("train", "supervised")
