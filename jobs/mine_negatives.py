"""The mining job: `python jobs/mine_negatives.py --config jobs/configs/supervised_tiny.yaml [--set key=value ...]`.

Writes the DHNM candidate pools the supervised stage loads (dhnm.candidates). Under Ray:
`ray job submit --working-dir . -- python jobs/mine_negatives.py --config jobs/configs/supervised_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("mine")
