"""The pipeline job: `python jobs/pipeline.py --config jobs/configs/pipeline_tiny.yaml [--set key=value ...]`.

Under Ray: `ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline_tiny.yaml`.
"""

from _entry import run

if __name__ == "__main__":
    run("pipeline")
