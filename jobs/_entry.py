"""Shared start of the job scripts: put the repo root on sys.path (also under `ray job submit`) and run the CLI."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(*command: str) -> None:
    """Run `conan <command> <argv>` and exit with its status.

    A job submitted with `--working-dir .` runs in Ray's copy of the checkout; with $CONAN_BASE_DIR set (cluster/local.sh's
    CONAN_RUNTIME_ENV sets it) relative paths in configs resolve against the submitter's checkout instead, so outputs land
    there and stages find each other's. The code still comes from the copy.
    """
    if os.environ.get("CONAN_BASE_DIR"):
        os.chdir(os.environ["CONAN_BASE_DIR"])
    from conan.cli import main
    sys.exit(main([*command, *sys.argv[1:]], script=f"jobs/{Path(sys.argv[0]).name}"))
