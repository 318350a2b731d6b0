"""`serve run serve/config.yaml` as the README says: its own Ray, no other running in this module."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_serve import HISTORY, QUERY

pytestmark = pytest.mark.slow


def test_serve_run_with_the_shipped_config(tmp_path):
    """The shipped config with its port and model changed."""
    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "serve" / "config.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(model="tiny", backend="transformers")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = str(Path(sys.executable).parent / "serve")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FSPO_API_KEY")}  # a local Ray, no key
    process = subprocess.Popen([serve_cli, "run", str(path)], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "serve run exited"
            time.sleep(1)
        else:
            pytest.fail("the service did not come up within 240 s")
        body = httpx.post(f"http://127.0.0.1:{port}/v1/personalize", json={"history": HISTORY, "query": QUERY,
                          "max_new_tokens": 8}, timeout=120).json()  # fmt: skip
        assert body["shots_used"] == 2 and body["model"] == "tiny"
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)
