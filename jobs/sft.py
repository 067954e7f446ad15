"""The sft job: `python jobs/sft.py --config jobs/configs/sft_tiny.yaml [--set key=value ...]`.

Under Ray: `ray job submit --working-dir . -- python jobs/sft.py --config jobs/configs/sft_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("train", "sft")
