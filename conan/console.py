"""The console of a run: the platform's own lines (one per step, a progress line per training report) on the terminal;
Ray's, Ray Data's, DeepSpeed's and the workers' output in a log file under the run's directory.

Redirection happens at the file-descriptor level, so it also catches what Ray's C++ core and the processes it starts
write to stdout and stderr, not only Python's loggers.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

from conan.config import USER_ERRORS

LOG_DIR = "logs"  # under a command's output_dir; may precede the outputs of a step that wants an empty directory
_console: TextIO | None = None  # the terminal while `quiet` routes everything else to its log file


def log_file(output_dir: str | Path, command: str) -> Path:
    """Where a command run into `output_dir` writes the internals: <output_dir>/logs/<command>.log."""
    return Path(output_dir) / LOG_DIR / f"{command}.log"


def say(line: str) -> None:
    """Print one of the platform's own lines where the user reads them (the terminal, also while `quiet` is on)."""
    stream = _console or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def is_quiet() -> bool:
    """Whether `quiet` is routing the internals to a log file (so worker lines must be relayed to be seen)."""
    return _console is not None


@contextmanager
def quiet(path: str | Path, verbose: bool = False) -> Iterator[Path | None]:
    """Send everything this process (and what it starts) writes to stdout and stderr into the file `path`, appending,
    while `say` keeps writing to the terminal; an error leaving the block still reaches the terminal in full, after
    the streams are restored. `verbose`: change nothing (the internals stay on the console)."""
    global _console
    if verbose or _console is not None:
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # a terminal or file: keep a handle on it before fd 1 is pointed at the log
        console = open(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", closefd=True)
    except (AttributeError, io.UnsupportedOperation, ValueError):  # an in-memory stream (pytest's capsys)
        console = sys.stdout
    joined_before = _ray_joined()
    saved = os.dup(1), os.dup(2), sys.stdout, sys.stderr
    log = open(path, "a", buffering=1, encoding="utf-8")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    _console = console
    say(f"logs: {path} (Ray, DeepSpeed and worker output; --verbose prints them here)")
    try:
        yield path
    except USER_ERRORS:
        raise  # one line the user acts on; the log adds nothing
    except BaseException:
        say(f"failed: the error follows; what led to it is in {path}")
        raise
    finally:
        if _ray_joined() and not joined_before:
            # Leave the Ray this command joined while its output still goes to the log: Ray's log monitor would
            # otherwise print the workers' last lines on the terminal after the command's own.
            import ray
            ray.shutdown()
        log.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        sys.stdout, sys.stderr = saved[2], saved[3]
        _console = None
        if console is not saved[2]:
            console.close()
        # `log` stays open: loggers created inside the block (transformers', Ray Data's) hold it as their stream and
        # may still write, e.g. at exit; it closes when the last of them lets go.


def _ray_joined() -> bool:
    """Whether this process is connected to Ray (without importing Ray when nothing did)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class ReportFollower:
    """Relays a training run's reports (the JSON lines rank 0 appends to metrics.jsonl) to the console as they land,
    formatted by `format_report`, when `quiet` hides the workers' own lines; a no-op otherwise."""

    def __init__(self, metrics_file: str | Path, format_report: Callable[[dict], str], interval_s: float = 1.0):
        self.path = Path(metrics_file)
        self.format = format_report
        self.interval_s = interval_s
        self.offset = self.path.stat().st_size if self.path.is_file() else 0  # earlier attempts' reports were shown
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="conan-report-follower", daemon=True)

    def __enter__(self) -> "ReportFollower":
        if is_quiet():
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stopped.set()
            self.thread.join()
        self.poll()  # the last report

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Print every complete report appended since the last call."""
        if not is_quiet() or not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            if line.strip():
                say(self.format(json.loads(line)))
