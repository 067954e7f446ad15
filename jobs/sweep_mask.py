"""The soft-mask sweep on Ray Tune: `python jobs/sweep_mask.py --config jobs/configs/sweep_mask_tiny.yaml`.

Under Ray: `ray job submit --working-dir . -- python jobs/sweep_mask.py --config jobs/configs/sweep_mask_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("sweep")
