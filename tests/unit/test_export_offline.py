"""Exports make no network call: nothing at run time reaches the Hugging Face Hub (a logging server stands in for it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def test_adding_the_sentence_transformers_files_asks_the_hub_nothing(small_embedding_model_dir, tmp_path):
    """With the Hub reachable (HF_HUB_OFFLINE unset, HF_ENDPOINT a local server that records every request), writing
    the export's sentence-transformers files sends it no request (its model card looked the directory up)."""
    requests = []

    class Recorder(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    model = tmp_path / "exp" / "m"
    shutil.copytree(small_embedding_model_dir, model)
    # A process of its own: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE (set for the tests) at import.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}"
    code = f"from conan.export import add_sentence_transformers_files; add_sentence_transformers_files({str(model)!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parents[2])
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    assert (model / "modules.json").is_file() and requests == []
