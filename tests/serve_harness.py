"""Deploy a serve_config-style dict on a local Ray exactly as `serve run` does (ServeDeploySchema -> deploy_apps),
for the end-to-end suites (tests/app, tests/reliability)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
import ray
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]

# A shared 2-core CI box can take longer than Serve's 5 s default to report a new proxy ready; Serve then kills it.
SLOW_MACHINE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_running(app: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(status.message)
        time.sleep(0.5)
    raise TimeoutError(f"{app} not running after {timeout_s} s")


@contextlib.contextmanager
def serve_app(raw_config: dict, *, env: dict[str, str] | None = None, pythonpath: tuple[Path, ...] = (),
              app: str = "adaserve", timeout_s: float = 300) -> Iterator[str]:
    """Start a local Ray (4 logical CPUs) with ``env`` inherited by every actor, deploy ``raw_config`` and yield
    ``http://127.0.0.1:<port>`` once ``app`` runs; the config's http_options are replaced by a free local port."""
    port = free_port()
    raw = {**raw_config, "http_options": {"host": "127.0.0.1", "port": port}}
    path = os.pathsep.join(p for p in (*map(str, pythonpath), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**SLOW_MACHINE_ENV, **(env or {}), "PYTHONPATH": path}.items():
            mp.setenv(key, value)  # inherited by the raylet and so by every Serve actor
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            config = ServeDeploySchema.model_validate(raw)
            client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
            client.deploy_apps(config)
            wait_running(app, timeout_s=timeout_s)
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()
