"""Start and stop a real SGLang server on 127.0.0.1 (the demo, the tests and the benchmarks).

The server runs in its own process group so that stopping it by PID also stops its scheduler and
detokenizer children. Every wait is bounded; a server that dies or never becomes healthy raises
``ServerStartError`` carrying the tail of its log.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import requests

# --sleep-on-idle: an idle scheduler otherwise busy-polls a whole core, which starves a second
# server (or the client) on a 2-core machine.
CPU_ARGS = (
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--dtype",
    "float32",
    "--disable-cuda-graph",
    "--sleep-on-idle",
)


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port from ``bind(0)``, once released,
    can be handed out again before the server binds it: a server's own scheduler took its HTTP
    port that way in a test run (``address already in use``, then a start-up timeout)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServerStartError(f"no free port below the ephemeral range (from {low})")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


class ServerProcess:
    """``with ServerProcess(model, extra_args) as server: requests.post(server.url + ...)``."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        extra_args: Sequence[str] = (),
        *,
        cpu: bool = True,
        max_total_tokens: int = 16384,
        port: int | None = None,
        start_timeout_s: float = 300.0,
        log_path: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-total-tokens",
            str(max_total_tokens),
            *(CPU_ARGS if cpu else ()),
            *extra_args,
        ]
        self.cpu = cpu
        self.start_timeout_s = start_timeout_s
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="sglang-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.progress = progress
        self.proc: subprocess.Popen | None = None
        self._launched_at = 0.0

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def launch(self) -> ServerProcess:
        """Spawn the server without waiting (several servers can then start side by side)."""
        env = dict(os.environ)
        if self.cpu:
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
            )
        self._launched_at = time.monotonic()
        return self

    def wait_ready(self) -> ServerProcess:
        """Block until /health answers 200; raise ServerStartError if it dies or times out."""
        started = self._launched_at
        deadline = started + self.start_timeout_s
        next_note = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"server exited with code {self.proc.returncode} during start-up")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    if self.progress:
                        self.progress(
                            f"server up on {self.url} in {time.monotonic() - started:.0f}s"
                        )
                    return self
            except requests.RequestException:
                pass
            if self.progress and time.monotonic() >= next_note:
                self.progress(f"waiting for the server ({time.monotonic() - started:.0f}s)...")
                next_note += 10
            time.sleep(0.5)
        self._fail(f"server not healthy after {self.start_timeout_s:.0f}s")

    def start(self) -> ServerProcess:
        return self.launch().wait_ready()

    def _fail(self, why: str) -> NoReturn:
        self.stop()
        raise ServerStartError(f"{why}; `{' '.join(self.args)}`; log tail:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after the timeout."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the server's PID
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(pgid):
                self.proc.poll()
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serving(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    """Run servers side by side: launched together, waited for, all stopped on exit."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM the server if the process that started it dies, so a
    killed test run or demo never leaves servers behind."""
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
