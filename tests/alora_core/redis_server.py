"""Throwaway Redis deployments on free loopback ports, for the Redis tier tests (no persistence):

    RedisServer       one redis-server
    RedisClusterSet   a Redis Cluster: N masters, one replica each (cluster-node-timeout 1 s)
    SentinelSet       a master, its replica and three Sentinels watching them

Tests that need them are marked `redis`. Without the binary they skip on a developer machine and FAIL
under CI (CI=true), where `.ci/run` installs the Debian package first. Every process is killed by
`stop()`, also when start-up fails half way (the fixtures call it in a `finally`).
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

CLUSTER_NODE_TIMEOUT_MS = 1000  # failure detection: a killed master is replaced within ~2-4 s
SENTINEL_DOWN_AFTER_MS = 1000
MASTER_NAME = "alora"


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + ": required under CI")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(0.05)


class RedisServer:
    """One redis-server on 127.0.0.1:`port`; `extra` are more command-line options."""

    def __init__(self, binary: str, port: int, extra: list[str] | None = None, workdir: Path | None = None):
        self.binary = binary
        self.port = port
        self.extra = extra or []
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.address = f"127.0.0.1:{port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._proc is None
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        options += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once (default: 5 s)
        if self.workdir is not None:
            options += ["--dir", str(self.workdir)]
        self._proc = subprocess.Popen(
            [self.binary, *self.extra, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self._proc is not None

    def kill(self) -> None:
        """SIGKILL: the way a crashed or partitioned Redis looks to its clients."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


class RedisClusterSet:
    """`masters` masters with `replicas` (0 or 1) replica each. `cluster-require-full-coverage no`:
    while one shard fails over, the other masters keep serving their slots (docs/operations.md)."""

    def __init__(self, binary: str, masters: int = 3, full_coverage: bool = False, replicas: int = 1) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="alora-cluster-"))
        options = [
            "--cluster-enabled", "yes",
            "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage", "yes" if full_coverage else "no",
            "--cluster-replica-validity-factor", "0",  # a replica may always take over (tests)
        ]  # fmt: skip
        self.nodes: list[RedisServer] = []
        self.bus_ports: list[int] = []
        for _ in range((1 + replicas) * masters):
            port = free_port()
            self.bus_ports.append(free_port())  # not port + 10000: free ports go up to 65535
            bus = ["--cluster-port", str(self.bus_ports[-1])]
            extra = [*options, *bus, "--cluster-config-file", f"nodes-{port}.conf"]
            self.nodes.append(RedisServer(binary, port, extra, self.workdir))
        self.num_masters = masters

    @property
    def url(self) -> str:
        """The service's URL: every master as a seed node."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[: self.num_masters])

    def start(self) -> "RedisClusterSet":
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self) -> None:
        """Slots split evenly over the masters; node i + masters replicates master i."""
        m = self.num_masters
        clients = [n.client() for n in self.nodes]
        first = self.nodes[0]
        for i, c in enumerate(clients[:m]):
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * 16384 // m, (i + 1) * 16384 // m - 1)
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port, self.bus_ports[0])
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]

        last_meet = [time.monotonic()]

        def everyone_known() -> bool:
            lonely = [
                c for c in clients if len(c.execute_command("CLUSTER", "NODES").splitlines()) < len(clients)
            ]
            if lonely and time.monotonic() - last_meet[0] > 2.0:  # a handshake lost (loaded machine): again
                last_meet[0] = time.monotonic()
                for c in (c for c in lonely if c is not clients[0]):
                    c.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port, self.bus_ports[0])
            return not lonely

        wait_for(everyone_known, "every cluster node knows every other")
        for i, c in enumerate(clients[m:]):
            c.execute_command("CLUSTER", "REPLICATE", ids[i])

        def ready() -> bool:
            if not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients):
                return False
            return all(c.info("replication").get("master_link_status") == "up" for c in clients[m:])

        wait_for(ready, "the cluster is ok and every replica in sync")

    def masters(self) -> list[RedisServer]:
        """The nodes serving slots now (a promoted replica included)."""
        alive = [n for n in self.nodes if n.running]
        for probe in alive:
            try:
                lines = probe.client().execute_command("CLUSTER", "NODES").decode().splitlines()
            except redis.RedisError:
                continue
            ports = {
                int(f[1].split("@")[0].rsplit(":", 1)[1])
                for f in (line.split() for line in lines)
                if "master" in f[2] and "fail" not in f[2] and len(f) > 8
            }
            return [n for n in alive if n.port in ports]
        raise RuntimeError("no cluster node answers")

    def master_of(self, key: str) -> RedisServer:
        """The master serving `key`'s slot now."""
        client = self.masters()[0].client()
        slot = client.execute_command("CLUSTER", "KEYSLOT", key)
        port = next(int(m[1]) for start, end, m in _slot_masters(client) if start <= slot <= end)
        return next(n for n in self.nodes if n.port == port)

    def wait_promoted(self, killed: RedisServer, timeout_s: float = 30.0) -> RedisServer:
        """Wait until a replica took over `killed`'s slots and every live node agrees; the new master."""
        replica = self.nodes[(self.nodes.index(killed) + self.num_masters) % len(self.nodes)]

        def promoted() -> bool:
            alive = [n for n in self.nodes if n.running]
            if replica.client().info("replication")["role"] != "master":
                return False
            for node in alive:
                info = node.client().execute_command("CLUSTER", "INFO")
                if b"cluster_state:ok" not in info:
                    return False
                if any(int(m[1]) == killed.port for *_, m in _slot_masters(node.client())):
                    return False
            return True

        wait_for(promoted, f"a replica took over from {killed.address}", timeout_s)
        return replica

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _slot_masters(client: redis.Redis) -> list[tuple[int, int, list[object]]]:
    return [(s[0], s[1], s[2]) for s in client.execute_command("CLUSTER", "SLOTS")]


class SentinelSet:
    """A master, one replica and three Sentinels (quorum 2, down after 1 s)."""

    def __init__(self, binary: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="alora-sentinel-"))
        self.master = RedisServer(binary, free_port(), workdir=self.workdir)
        self.replica = RedisServer(
            binary, free_port(), ["--replicaof", "127.0.0.1", str(self.master.port)], self.workdir
        )
        self.sentinels: list[RedisServer] = []
        for _ in range(3):
            port = free_port()
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {SENTINEL_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self.sentinels.append(RedisServer(binary, port, [str(conf), "--sentinel"], self.workdir))

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + f"/{MASTER_NAME}/0"

    def start(self) -> "SentinelSet":
        try:
            for server in [self.master, self.replica, *self.sentinels]:
                server.start()
            wait_for(
                lambda: self.replica.client().info("replication").get("master_link_status") == "up",
                "the replica is in sync",
            )
            wait_for(
                lambda: all(
                    s.client().sentinel_master(MASTER_NAME)["num-other-sentinels"] == 2
                    for s in self.sentinels
                ),
                "the Sentinels know each other",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def master_address(self) -> str:
        host, port = (
            self.sentinels[0].client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        )
        return f"{host.decode()}:{port.decode()}"

    def wait_promoted(self, timeout_s: float = 60.0) -> None:
        """Wait until every Sentinel names the replica as the master and it accepts writes."""

        def promoted() -> bool:
            for s in self.sentinels:
                _, port = s.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                if int(port) != self.replica.port:
                    return False
            return self.replica.client().info("replication")["role"] == "master"

        wait_for(promoted, "Sentinel promoted the replica", timeout_s)

    def stop(self) -> None:
        for server in [*self.sentinels, self.master, self.replica]:
            server.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
