"""Shared start of the job scripts: put the repo root on sys.path (also under `ray job submit`) and run the CLI."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(*command: str) -> None:
    """Run `conan <command> <argv>` and exit with its status."""
    from conan.cli import main
    sys.exit(main([*command, *sys.argv[1:]]))
