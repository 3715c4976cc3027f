"""A Redis Sentinel group on loopback, all real processes: a primary, replicas, and sentinels
(``redis-server --sentinel``), for the failover tests and benchmarks/failover.py."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import redis

from producer.embedded_redis import EmbeddedRedis, find_redis_server, free_port
from tests.waiting import wait_for

MASTER = "belle"
# How long the sentinels wait for the primary to answer before they call it down (Redis's default is 30 s).
DOWN_AFTER_MS = 1500
# Each server keeps an append-only file: a primary that comes back has its old data, which it must give up.
AOF = ["--appendonly", "yes", "--appendfsync", "everysec"]


class ReplicationLink:
    """A TCP relay between the first replica and the primary. ``hold()`` stops passing the primary's replication
    stream on (the replica's acknowledgements still pass): the primary goes on accepting writes that no replica
    has, as in a partition between them, until ``cut()`` drops the link and what it held."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holding = threading.Event()
        self.closed = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                replica, _ = self.listener.accept()
            except OSError:
                continue
            try:
                primary = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                replica.close()
                continue
            self.pairs.append((replica, primary))
            threading.Thread(target=self._relay, args=(replica, primary), daemon=True).start()

    def _relay(self, replica: socket.socket, primary: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                sources = [replica] if self.holding.is_set() else [replica, primary]
                ready, _, _ = select.select(sources, [], [], 0.05)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (primary if source is replica else replica).sendall(data)
        except OSError:
            pass
        finally:
            replica.close()
            primary.close()

    def hold(self) -> None:
        self.holding.set()

    def cut(self) -> None:
        self.closed.set()
        self.listener.close()
        for replica, primary in self.pairs:
            for end in (replica, primary):
                try:
                    end.close()
                except OSError:
                    pass


class SentinelGroup:
    """``with SentinelGroup() as group: group.url`` — a primary, ``replicas`` replicas and ``sentinels``
    sentinels (quorum: a majority), ready once every sentinel knows every other and every replica.
    ``partition(replica)`` puts a ReplicationLink between a replica and the primary, and holds it."""

    def __init__(self, *, replicas: int = 1, sentinels: int = 3, password: str | None = "sentinel-test", down_after_ms: int = DOWN_AFTER_MS):
        self._tmp = tempfile.TemporaryDirectory(prefix="belle-sentinels-")
        self.root = Path(self._tmp.name)
        self.password = password
        self.down_after_ms = down_after_ms
        self.ports = [free_port() for _ in range(1 + replicas)]
        self.servers: dict[int, EmbeddedRedis] = {}
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[subprocess.Popen] = []
        self._logs: list = []
        self.link: ReplicationLink | None = None

    @property
    def url(self) -> str:
        hosts = ";".join(f"sentinel://{f':{self.password}@' if self.password and i == 0 else ''}127.0.0.1:{port}"
                         for i, port in enumerate(self.sentinel_ports))
        return f"{hosts}/0?master_name={MASTER}"

    def __enter__(self) -> SentinelGroup:
        try:
            primary, *replicas = self.ports
            self.start_server(primary)
            for port in replicas:
                self.start_server(port, replica_of=primary)
            for port in self.sentinel_ports:
                self._start_sentinel(port, primary)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_server(self, port: int, *, replica_of: int | None = None) -> EmbeddedRedis:
        """(Re)start the server on ``port`` with its data folder: as a replica of ``replica_of``, or as it was."""
        args = [*AOF, "--replica-announce-ip", "127.0.0.1"]
        if self.password:
            args += ["--masterauth", self.password]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        data = self.root / f"redis-{port}"
        data.mkdir(exist_ok=True)
        self.servers[port] = EmbeddedRedis(port=port, data_dir=data, args=args, password=self.password).start()
        return self.servers[port]

    def _start_sentinel(self, port: int, primary: int) -> None:
        folder = self.root / f"sentinel-{port}"
        folder.mkdir()
        config = folder / "sentinel.conf"
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {folder}", f"sentinel monitor {MASTER} 127.0.0.1 {primary} {len(self.sentinel_ports) // 2 + 1}",
                 f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}", f"sentinel failover-timeout {MASTER} 10000",
                 f"sentinel parallel-syncs {MASTER} 1"]
        if self.password:
            lines += [f"sentinel auth-pass {MASTER} {self.password}"]
        config.write_text("\n".join(lines) + "\n")
        log = open(folder / "sentinel.log", "wb")
        self._logs.append(log)
        self.sentinels.append(subprocess.Popen([find_redis_server(), str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL))

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2)

    def primary_port(self) -> int | None:
        """The primary's port, as a majority of the sentinels name it (None while they disagree)."""
        named: list[int] = []
        for port in self.sentinel_ports:
            try:
                address = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            if address:
                named.append(int(address[1]))
        for candidate in set(named):
            if named.count(candidate) > len(self.sentinel_ports) // 2:
                return candidate
        return None

    def role(self, port: int) -> tuple[str, int | None]:
        """('master', None), or ('slave', the port it replicates) with its link up; ('down', None) if it does not answer."""
        try:
            info = redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=2).info("replication")
        except redis.RedisError:
            return "down", None
        if info["role"] == "master":
            return "master", None
        return ("slave", int(info["master_port"])) if info.get("master_link_status") == "up" else ("syncing", int(info["master_port"]))

    def wait_ready(self, timeout: float = 60.0) -> None:
        wanted_replicas = len(self.ports) - 1

        def formed() -> bool:
            try:
                views = [self.sentinel(port).sentinel_master(MASTER) for port in self.sentinel_ports]
            except redis.RedisError:
                return False
            return all(int(v["num-other-sentinels"]) == len(self.sentinel_ports) - 1 and int(v["num-slaves"]) == wanted_replicas
                       and "s_down" not in v["flags"] for v in views) and all(self.role(p)[0] == "slave" for p in self.ports[1:])

        wait_for(formed, timeout, lambda: f"the sentinel group formed:\n{self.logs()}")

    def partition(self, replica: int, primary: int) -> ReplicationLink:
        """Move ``replica``'s replication onto a ReplicationLink to ``primary`` (a partial resync), then hold it.
        (Done just before it is needed: the sentinels set a replica that names another master than theirs
        back to theirs once its configuration has stood for their failover timeout, 10 s.)"""
        self.link = ReplicationLink(primary)
        redis.Redis(host="127.0.0.1", port=replica, password=self.password, socket_timeout=2).replicaof("127.0.0.1", self.link.port)
        wait_for(lambda: self.role(replica) == ("slave", self.link.port), 30, f"the replica on {replica} replicates through the link")
        self.link.hold()
        return self.link

    def held_bytes(self, primary: int) -> int:
        """How far the primary's replication stream is ahead of what its replicas acknowledged (the most behind)."""
        info = redis.Redis(host="127.0.0.1", port=primary, password=self.password, socket_timeout=2).info("replication")
        offsets = [int(value["offset"]) for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)]
        return int(info["master_repl_offset"]) - min(offsets) if offsets else 0

    def kill(self, port: int) -> None:
        """SIGKILL the server on ``port``: nothing written, no goodbye to its clients or replicas."""
        server = self.servers[port]
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        server.stop()  # (its log closed; its data folder stays)

    def logs(self) -> str:
        return "\n".join(f"--- sentinel {p}\n" + (self.root / f"sentinel-{p}" / "sentinel.log").read_text(errors="replace")[-3000:]
                         for p in self.sentinel_ports if (self.root / f"sentinel-{p}" / "sentinel.log").exists())

    def stop(self) -> None:
        if self.link is not None:
            self.link.cut()
        for process in self.sentinels:
            process.terminate()
        for process in self.sentinels:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        for server in self.servers.values():
            server.stop()
        for log in self._logs:
            log.close()
        self._tmp.cleanup()
