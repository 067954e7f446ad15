"""The CLR job: `python jobs/build_clr.py --config jobs/configs/clr_tiny.yaml [--set key=value]`.

Under Ray: `ray job submit --working-dir . -- python jobs/build_clr.py --config jobs/configs/clr_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("clr")
