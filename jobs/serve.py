"""The serving job: `python jobs/serve.py --config jobs/configs/serve_tiny.yaml [--set key=value ...]`.

`--set backend=ray --set replicas=2` deploys on Ray Serve instead of a single uvicorn process.
"""

from _entry import run

if __name__ == "__main__":
    run("serve")
