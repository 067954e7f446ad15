"""The console: the platform's lines on the terminal, every other byte a process writes in the run's log file."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys
    from conan.console import quiet, say

    logging.basicConfig()  # a handler bound to stderr before the redirection, as Ray's and DeepSpeed's are
    with quiet(sys.argv[1], verbose=sys.argv[2] == "1"):
        say("[pipeline] weak: running")
        print("(RayTrainWorker pid=1) python print")
        os.write(2, b"[core_worker.cc:2465] C++ log\\n")
        logging.getLogger("deepspeed").warning("logger line")
        subprocess.run([sys.executable, "-c", "print('child process')"])
        if sys.argv[3] == "1":
            raise RuntimeError("stage failed: worker traceback")
    print("after")
""")
INTERNALS = ("python print", "C++ log", "logger line", "child process")


def _run(tmp_path, verbose="0", fail="0"):
    log = tmp_path / "logs" / "pipeline.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log), verbose, fail], capture_output=True, text=True,
                         timeout=60)
    return out, log


def test_internals_go_to_the_log_and_the_platforms_lines_to_the_terminal(tmp_path):
    out, log = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"logs: {log} (Ray, DeepSpeed and worker output; --verbose prints them here)",
                                       "[pipeline] weak: running", "after"]
    assert out.stderr == ""
    text = log.read_text()
    assert all(line in text for line in INTERNALS) and "[pipeline]" not in text


def test_verbose_leaves_everything_on_the_terminal(tmp_path):
    out, log = _run(tmp_path, verbose="1")
    assert all(line in out.stdout + out.stderr for line in INTERNALS) and "[pipeline] weak: running" in out.stdout
    assert not log.exists()


def test_an_error_reaches_the_terminal_in_full(tmp_path):
    out, log = _run(tmp_path, fail="1")
    assert out.returncode == 1
    assert f"failed: the error follows; what led to it is in {log}" in out.stdout
    assert "Traceback" in out.stderr and "RuntimeError: stage failed: worker traceback" in out.stderr
    assert "child process" in log.read_text() and "child process" not in out.stdout


def test_reports_are_relayed_once_each_and_only_when_complete(tmp_path, capsys):
    from conan.console import ReportFollower, quiet

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 25}) + "\n")  # an earlier attempt's report, already shown
    with quiet(tmp_path / "logs" / "train.log"):
        follower = ReportFollower(metrics, lambda m: f"step {m['step']}/100", interval_s=3600)
        with follower:
            with metrics.open("a") as f:
                f.write(json.dumps({"step": 50}) + "\n" + '{"step": 7')  # a report being written
            follower.poll()
            with metrics.open("a") as f:
                f.write("5}\n")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["step 50/100", "step 75/100"]


def test_reports_are_not_relayed_when_the_workers_lines_are_on_the_console(tmp_path, capsys):
    from conan.console import ReportFollower

    metrics = tmp_path / "metrics.jsonl"
    with ReportFollower(metrics, lambda m: f"step {m['step']}"):
        metrics.write_text(json.dumps({"step": 25}) + "\n")
    assert capsys.readouterr().out == ""
