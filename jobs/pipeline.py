"""Entry point of the end-to-end pipeline: `python jobs/pipeline.py --config jobs/configs/pipeline_tiny.yaml`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from conan.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
