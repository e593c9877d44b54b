"""The real server as a child process, for end-to-end tests.

``ServerProcess`` starts ``python -m livesrv serve`` on free ports with its own data dir,
waits for ``/readyz``, and can add users through the real CLI. Its log is kept in a file and
printed when a test fails to start it, so a failure says why.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, *, redis: str | None = None, database: str | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 config: str | None = None, node_id: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.http_port = free_port()
        self.rtmp_port = free_port()
        self.redis = redis
        self.database = database
        self.extra_args = extra_args or []
        self.env = env or {}
        self.config = config
        self.node_id = node_id
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rtmp_url(self, stream_key: str) -> str:
        return f"rtmp://127.0.0.1:{self.rtmp_port}/live/{stream_key}"

    def _core_args(self) -> list[str]:
        args = ["--data-dir", str(self.data_dir)]
        if self.database:
            args += ["--database", self.database]
        if self.config:
            args += ["--config", self.config]
        return args

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "livesrv", "serve",
                "--http", f"127.0.0.1:{self.http_port}", "--rtmp", f"127.0.0.1:{self.rtmp_port}",
                *self._core_args(), *self.extra_args]
        if self.redis:
            args += ["--redis", self.redis]
        if self.node_id:
            args += ["--node-id", self.node_id]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s ({last}):\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def cli(self, *args: str) -> Any:
        """Run ``python -m livesrv ARGS`` against this server's store; parsed JSON output."""
        out = subprocess.run([sys.executable, "-m", "livesrv", *args, *self._core_args()],
                             cwd=REPO, capture_output=True, check=True, timeout=60)
        return json.loads(out.stdout)

    def add_user(self, name: str, password: str = "correct horse battery") -> dict[str, Any]:
        """A new user: ``username``, ``stream_key``, ``token``."""
        return self.cli("users", "add", name, "--password", password)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, nothing gets to clean up."""
        self.stop(signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def get_json(url: str, *, token: str | None = None, timeout: float = 10) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body.startswith((b"{", b"[")) else body.decode()


def post_json(url: str, body: Any, *, token: str | None = None, method: str = "POST",
              timeout: float = 10) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body.startswith((b"{", b"[")) else body.decode()
