"""The Table 4 ablation on Ray Tune: `python jobs/ablation.py --config jobs/configs/ablation_tiny.yaml`.

Under Ray: `ray job submit --working-dir . -- python jobs/ablation.py --config jobs/configs/ablation_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("ablation")
