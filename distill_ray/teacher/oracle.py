"""The oracle teacher: an offline stand-in for a real LLM teacher.

An OpenAI-compatible HTTP server on 127.0.0.1 (`/v1/models`, `/v1/chat/completions`,
`/v1/completions`, plus `/stats` with its request counters and `/stats/reset`) that answers the synthetic
suite correctly and deterministically from the prompt text alone: it reads the last
"Question: ..." of the prompt, solves it with `synthetic.solve`, and replies with the
rationale ending "Therefore, the answer is N.". Anything else gets a polite non-answer.
It can inject faults (latency, 429, 5xx, hangs, malformed bodies, wrong answers) at
seeded rates, which is how the teacher stage's reliability is tested without a network.

Run as its own process so its event loop never competes with the client's:
    python -m distill_ray.teacher.oracle --port 0 --faults '{"p_5xx": 0.1}'
prints "oracle ready port=<port>" once it accepts connections.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from distill_ray.config import FaultConfig

READY_PREFIX = "oracle ready port="
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


@dataclass
class OracleHandle:
    process: subprocess.Popen
    port: int
    model: str = "oracle"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as r:
            return json.loads(r.read())

    def reset_stats(self) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/stats/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> "OracleHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_oracle(
    faults: FaultConfig | None = None,
    port: int = 0,
    *,
    model: str = "oracle",
    api_key_env: str | None = None,
    ready_timeout_s: float = 60.0,
) -> OracleHandle:
    """Start the oracle in a subprocess and wait until it accepts connections.

    `api_key_env` names an environment variable holding the key the oracle then demands
    (the key itself never appears on its command line).
    """
    faults = faults or FaultConfig()
    env = dict(os.environ)
    # The child must import this package even when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "distill_ray.teacher.oracle", "--port", str(port),
           "--model", model, "--faults", faults.model_dump_json()]
    if api_key_env:
        cmd += ["--api-key-env", api_key_env]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    found: list[int] = []

    def _read_ready() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith(READY_PREFIX):
                found.append(int(line[len(READY_PREFIX):].strip()))
                return

    reader = threading.Thread(target=_read_ready, daemon=True)
    reader.start()
    reader.join(ready_timeout_s)
    if not found:
        proc.kill()
        proc.wait(timeout=5)
        why = "did not become ready"
        if proc.returncode:
            why = f"exited with code {proc.returncode} (see its stderr above)"
        raise RuntimeError(f"oracle teacher {why} within {ready_timeout_s:.0f}s")
    return OracleHandle(process=proc, port=found[0], model=model)


async def _serve(app, port: int) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))  # loopback only, by design
    config = uvicorn.Config(
        app, http="httptools", log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=1, backlog=4096, timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # re-raises why it failed
            return
        await asyncio.sleep(0.02)
    print(f"{READY_PREFIX}{sock.getsockname()[1]}", flush=True)
    await task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill_ray.teacher.oracle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--model", default="oracle", help="model name it reports")
    parser.add_argument("--faults", default="{}", help="FaultConfig as JSON")
    parser.add_argument("--api-key-env", default=None, help="env var holding the API key to require (default: none)")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env: environment variable {args.api_key_env} is not set")
    try:
        faults = FaultConfig.model_validate_json(args.faults)
    except ValueError as e:
        parser.error(f"--faults: not a valid FaultConfig ({str(e).splitlines()[0]}): {args.faults!r}")
    from distill_ray.teacher.oracle_server import create_app

    try:
        app = create_app(faults, args.model, api_key)
    except ValueError as e:
        parser.error(str(e))
    try:
        import uvloop

        uvloop.run(_serve(app, args.port))
    except ImportError:
        asyncio.run(_serve(app, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
