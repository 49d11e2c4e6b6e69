"""Real local Redis topologies for tests: a six-node Redis Cluster and a Sentinel-managed pair.

Every node is a ``redis-server`` child process on a free port with its own temporary directory;
``stop()`` kills each by PID (SIGKILL, then waits for it) and removes the directories. Nothing
persists (``--save "" --appendonly no``), so a node restarted after a kill comes back empty.
Data nodes run with ``--repl-diskless-sync-delay 0`` (a full sync starts at once, not after 5 s).

Nothing here sleeps to synchronise: every wait is :func:`wait_until`, which polls a condition
until it holds or a deadline passes and then raises a ``RuntimeError`` that says what was missing.

Losing acknowledged writes on purpose (``lose_writes_then_failover`` on both classes; steps 1-3 are
``pause_replication``, and ``resume_replication`` without the kill undoes them losslessly):

1. wait until the replica has applied everything the primary has (replication offsets equal);
2. SIGSTOP the replica, so it cannot reconnect (and wait until the kernel reports it stopped);
3. ``CLIENT KILL TYPE replica`` on the primary: it closes the replication link *now*. This step is
   what makes the loss certain. Stopping the replica alone is not enough: the primary keeps
   streaming into the TCP connection, the stopped replica's kernel buffers and acknowledges the
   bytes, and on SIGCONT the replica applies them (tried: the "lost" write survived). With the link
   closed first, the window's writes reach only the primary's backlog;
4. run ``write()``: the primary accepts and acknowledges the writes, and no replica receives them;
5. SIGKILL the primary (its memory, the only copy of the window's writes, is gone), SIGCONT the
   replica: it reads EOF on the closed link and cannot reconnect to the dead primary;
6. promote the replica: Cluster sends it ``CLUSTER FAILOVER TAKEOVER``, which needs neither the
   dead primary nor a vote; Sentinel lets the sentinels promote it themselves once the primary is
   down for ``down-after-milliseconds`` and a quorum agrees;
7. restart the old primary, empty: a cluster node rejoins from its nodes.conf and learns from the
   newer config epoch that it is now a replica; under Sentinel it comes back as a master and the
   sentinels convert it to a replica (they wait 8 s after it comes back before doing so).

The writes made before step 2 are on the promoted replica; those made in step 4 are not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from .conftest import free_port, unavailable

HOST = "127.0.0.1"
SLOTS = 16384
POLL_INTERVAL = 0.05
START_TIMEOUT = 30.0
FAILOVER_TIMEOUT = 30.0


def wait_until(check: Callable[[], str | None], timeout: float, what: str) -> None:
    """Poll ``check`` until it returns None (the condition holds) or ``timeout`` seconds pass.

    ``check`` returns a short reason while the condition does not hold yet; a Redis or socket error
    counts as "not yet" too. On timeout a RuntimeError names ``what`` and the last reason.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            reason = check()
        except (redis.RedisError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: {reason}")
        time.sleep(POLL_INTERVAL)


def admin(port: int, timeout: float = 1.0) -> redis.Redis:
    """A plain client for one node (strings, no retries); use it as a context manager to close it."""
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        unavailable("redis-server", FileNotFoundError("redis-server"))
    assert exe is not None
    return exe


def _redis_cli() -> str:
    exe = shutil.which("redis-cli")
    if exe is None:
        unavailable("redis-cli", FileNotFoundError("redis-cli"))
    assert exe is not None
    return exe


def _replication(port: int) -> dict[str, Any]:
    with admin(port) as r:
        info: dict[str, Any] = r.info("replication")
        return info


def _info_field(text: str, field: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    return None


def _pairs(reply: dict[Any, Any] | list[Any]) -> dict[str, Any]:
    """A ``SENTINEL MASTER``-style reply as a dict: a RESP3 map, or RESP2's key, value, key, value..."""
    if isinstance(reply, dict):
        return {str(k): v for k, v in reply.items()}
    return {str(reply[i]): reply[i + 1] for i in range(0, len(reply) - 1, 2)}


def _children(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


class _Process:
    """One redis-server child: its command line, directory and PID; killed, paused, restarted by PID."""

    def __init__(self, port: int, argv: list[str], directory: str) -> None:
        self.port = port
        self.argv = argv
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "redis.log")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def reachable(self) -> bool:
        """Running and not stopped: it can answer."""
        return self.alive and not self.paused

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.proc = subprocess.Popen(
            self.argv, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.paused = False
        wait_until(self._answers, START_TIMEOUT, f"redis-server on port {self.port} to answer")

    def _answers(self) -> str | None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited; log tail:\n{self.log_tail()}")
        with admin(self.port, timeout=0.5) as r:
            r.ping()
        return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL by PID (a stopped process dies too) and reap it.

        A child it forked (an RDB transfer to a replica) is killed first, by its PID, so that no
        orphan outlives the node or holds on to its directory.
        """
        if self.proc is not None:
            if self.proc.poll() is None:
                for child in _children(self.proc.pid):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None
        self.paused = False

    def _state(self) -> str:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def pause(self) -> None:
        """SIGSTOP; returns once the kernel reports the process stopped."""
        assert self.proc is not None and self.alive
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True
        wait_until(
            lambda: None if self._state() in ("T", "t") else f"state {self._state()}",
            5,
            f"redis-server on port {self.port} to stop",
        )

    def resume(self) -> None:
        """SIGCONT; returns once the process runs again."""
        if self.proc is None or not self.paused:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        wait_until(
            lambda: None if self._state() not in ("T", "t") else "still stopped",
            5,
            f"redis-server on port {self.port} to continue",
        )
        self.paused = False


def _wait_caught_up(primary: int, replica: int, timeout: float = 10.0) -> None:
    """Until the replica has applied every write the primary had when this was called."""
    target = int(_replication(primary)["master_repl_offset"])

    def caught_up() -> str | None:
        repl = _replication(replica)
        if repl.get("master_link_status") != "up":
            return f"replica {replica}: link {repl.get('master_link_status')}"
        offset = int(repl.get("slave_repl_offset", -1))
        return None if offset >= target else f"replica {replica} at offset {offset} < {target}"

    wait_until(caught_up, timeout, f"replica {replica} to catch up with {primary}")


def _pause_replication(primary: int, replica: _Process) -> None:
    """Steps 1-3 of the module docstring: from now on ``primary`` acknowledges writes that
    ``replica`` does not receive. The replica is SIGSTOPped (it answers nothing meanwhile)."""
    _wait_caught_up(primary, replica.port)
    replica.pause()
    try:
        with admin(primary) as r:  # close the link now: nothing more is streamed to it
            killed = int(r.execute_command("CLIENT", "KILL", "TYPE", "replica"))
        if killed < 1:
            raise RuntimeError(f"primary {primary} had no replica connection to close")
    except BaseException:
        replica.resume()
        raise


def _resume_replication(primary: _Process, replica: _Process) -> None:
    """SIGCONT the replica; if the primary still runs, wait until the replica has caught up with it
    again (it reconnects and resynchronises: the writes made meanwhile are then not lost)."""
    replica.resume()
    if primary.alive:
        _wait_caught_up(primary.port, replica.port)


@dataclass(frozen=True)
class _ClusterNodeView:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None

    @property
    def role(self) -> str:
        return "slave" if "slave" in self.flags else "master"

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def _parse_nodes(text: str) -> list[_ClusterNodeView]:
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        views.append(
            _ClusterNodeView(
                id=fields[0],
                port=int(address.rsplit(":", 1)[1]),
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
            )
        )
    return views


SlotMap = tuple[tuple[int, int, int], ...]  # (first slot, last slot, primary port), sorted


class LocalCluster:
    """Three primaries and three replicas, ``redis-cli --cluster create ... --cluster-replicas 1``.

    Ports are free ports whose cluster-bus port (+10000) is free as well. ``start()`` returns once
    every node says ``cluster_state:ok``, all nodes agree on who serves which slot and every replica's
    link is up; failover, kill/restart and the write-losing failover wait the same way.
    """

    def __init__(self, node_timeout_ms: int = 2000) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self._nodes: dict[int, _Process] = {}
        self._paused_replica: dict[int, int] = {}  # primary port -> its SIGSTOPped replica

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        exe = _redis_server()
        cli = _redis_cli()
        taken: set[int] = set()
        for _ in range(6):
            port = self._cluster_port(taken)
            taken.update((port, port + 10000))
            directory = tempfile.mkdtemp(prefix=f"sqlcache-topo-cluster-{port}-")
            argv = [
                exe,
                "--port", str(port),
                "--bind", HOST,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--save", "",
                "--appendonly", "no",
                "--repl-diskless-sync-delay", "0",
                "--dir", directory,
                "--logfile", os.path.join(directory, "redis.log"),
            ]  # fmt: skip
            self.ports.append(port)
            self._nodes[port] = _Process(port, argv, directory)
        for node in self._nodes.values():
            node.start()
        addresses = [f"{HOST}:{p}" for p in self.ports]
        create = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        self.wait_settled(START_TIMEOUT)

    def stop(self) -> None:
        """Kill every node by PID and remove the directories (idempotent)."""
        for node in self._nodes.values():
            node.kill()
        for node in self._nodes.values():
            shutil.rmtree(node.dir, ignore_errors=True)
        self._nodes.clear()
        self.ports.clear()

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:  # pytest's skip included: nothing may be left running
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @staticmethod
    def _cluster_port(taken: set[int]) -> int:
        """A free port below 55536 whose bus port (port + 10000) is free too."""
        for _ in range(200):
            port = free_port()
            if port > 55535 or port in taken or port + 10000 in taken:
                continue
            try:
                with socket.socket() as s:
                    s.bind((HOST, port + 10000))
            except OSError:
                continue
            return port
        raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")

    # --- clients and views ---------------------------------------------------------------------

    @property
    def startup_url(self) -> str:
        return f"redis://{HOST}:{self.ports[0]}"

    def live_ports(self) -> list[int]:
        """Nodes that are running and not stopped."""
        return [p for p in self.ports if self._nodes[p].reachable]

    def client(self, **kwargs: Any) -> RedisCluster:
        """A cluster client knowing every live node (2 s socket timeouts unless overridden)."""
        options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2, **kwargs}
        nodes = [ClusterNode(HOST, p) for p in self.live_ports()]
        return RedisCluster(startup_nodes=nodes, **options)

    def node(self, port: int) -> redis.Redis:
        """A plain client for one node (strings, 2 s timeout); the caller closes it."""
        return admin(port, timeout=2)

    def _any_live(self) -> int:
        live = self.live_ports()
        if not live:
            raise RuntimeError("no live cluster node")
        return live[0]

    @staticmethod
    def _slot_map(port: int) -> SlotMap:
        with admin(port) as r:
            ranges = r.execute_command("CLUSTER", "SLOTS")
        return tuple(sorted((int(rng[0]), int(rng[1]), int(rng[2][1])) for rng in ranges))

    @staticmethod
    def _nodes_view(port: int) -> list[_ClusterNodeView]:
        with admin(port) as r:
            return _parse_nodes(r.execute_command("CLUSTER", "NODES"))

    def keyslot(self, key: str) -> int:
        with admin(self._any_live()) as r:
            return int(r.execute_command("CLUSTER", "KEYSLOT", key))

    def primary_for(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot (CLUSTER SLOTS of a live node)."""
        slot = self.keyslot(key)
        for first, last, port in self._slot_map(self._any_live()):
            if first <= slot <= last:
                return port
        raise RuntimeError(f"slot {slot} is served by no node")

    def slots_of(self, primary_port: int) -> list[tuple[int, int]]:
        """The slot ranges ``primary_port`` serves, as a live node sees them."""
        return [(a, b) for a, b, p in self._slot_map(self._any_live()) if p == primary_port]

    def replica_of(self, primary_port: int) -> int:
        """The port of a live, healthy replica of ``primary_port`` (as the primary sees it)."""
        view = self._nodes_view(primary_port)
        me = next(n for n in view if "myself" in n.flags)
        live = set(self.live_ports())
        for n in view:
            if n.master_id == me.id and n.role == "slave" and not n.failing and n.port in live:
                return n.port
        raise RuntimeError(f"primary {primary_port} has no live replica")

    # --- waiting -------------------------------------------------------------------------------

    def _problem(self) -> str | None:
        """None when the live nodes form a healthy cluster, else what is wrong."""
        live = self.live_ports()
        roles: dict[int, str] = {}
        maps: dict[int, SlotMap] = {}
        seen_as: dict[int, set[str]] = {p: set() for p in live}
        for port in live:
            with admin(port) as r:
                state = _info_field(r.execute_command("CLUSTER", "INFO"), "cluster_state")
                repl: dict[str, Any] = r.info("replication")
            if state != "ok":
                return f"node {port}: cluster_state:{state}"
            roles[port] = str(repl["role"])
            if roles[port] == "slave":
                if repl.get("master_link_status") != "up" or int(repl.get("master_sync_in_progress", 0)):
                    return f"replica {port}: link {repl.get('master_link_status')}"
                if int(repl["master_port"]) not in live:
                    return f"replica {port} follows {repl['master_port']}, which is down"
            view = {n.port: n for n in self._nodes_view(port)}
            for other in live:
                entry = view.get(other)
                if entry is None or entry.failing:
                    flags = sorted(entry.flags) if entry else "unknown"
                    return f"node {port} sees {other} as {flags}"
                seen_as[other].add(entry.role)
            maps[port] = self._slot_map(port)
        reference = maps[live[0]]
        if sum(b - a + 1 for a, b, _ in reference) != SLOTS:
            return "not every slot is served"
        for port, slot_map in maps.items():
            if slot_map != reference:
                return f"node {port} disagrees with node {live[0]} on the slot map"
        for port in live:
            if seen_as[port] != {roles[port]}:
                return f"node {port} is {roles[port]} but seen as {sorted(seen_as[port])}"
        for _, _, owner in reference:
            if roles.get(owner) != "master":
                return f"slots served by {owner}, which is {roles.get(owner, 'down')}"
        return None

    def wait_settled(self, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Until every live node: cluster_state:ok, same slot map, no failure flag on live nodes,
        each one's role agreed by all, every slot owner a master, every replica's link up."""
        wait_until(self._problem, timeout, "the cluster to settle")

    def _wait_serves(self, new_primary: int, ranges: list[tuple[int, int]]) -> None:
        def serves() -> str | None:
            if _replication(new_primary)["role"] != "master":
                return f"{new_primary} is not a master yet"
            for port in self.live_ports():
                owners = self._slot_map(port)
                for first, last in ranges:
                    if not any(a <= first and last <= b and p == new_primary for a, b, p in owners):
                        return f"node {port} does not route slots {first}-{last} to {new_primary}"
            return None

        wait_until(serves, FAILOVER_TIMEOUT, f"{new_primary} to serve the slots")

    # --- faults --------------------------------------------------------------------------------

    def failover(self, primary_port: int, force: bool = True) -> int:
        """``CLUSTER FAILOVER [FORCE]`` on the primary's replica; returns the new primary's port.

        Waits first until the replica has the primary's writes (nothing is lost), then until the
        replica is a master, every live node routes the slots to it, the old primary replicates from
        it and the cluster is settled.
        """
        replica = self.replica_of(primary_port)
        ranges = self.slots_of(primary_port)
        _wait_caught_up(primary_port, replica)
        with admin(replica) as r:
            r.execute_command("CLUSTER", "FAILOVER", *(["FORCE"] if force else []))
        self._wait_serves(replica, ranges)

        def demoted() -> str | None:
            repl = _replication(primary_port)
            if repl["role"] != "slave" or int(repl["master_port"]) != replica:
                return f"{primary_port} is {repl['role']}, not a replica of {replica}"
            return None

        wait_until(demoted, FAILOVER_TIMEOUT, f"{primary_port} to become a replica of {replica}")
        self.wait_settled()
        return replica

    def kill(self, port: int) -> None:
        """SIGKILL the node by PID and reap it (no waiting for the cluster to notice)."""
        self._nodes[port].kill()

    def restart(self, port: int) -> None:
        """Start a killed node again, same command line and directory (so same nodes.conf, no data);
        returns once it answers and the cluster is settled (a demoted node: replicating)."""
        self._nodes[port].start()
        self.wait_settled()

    def pause_replication(self, primary_port: int) -> int:
        """From now on ``primary_port`` acknowledges writes its replica does not receive.

        Waits until the replica has the primary's writes, SIGSTOPs it (so it cannot reconnect) and
        closes the replication link on the primary with ``CLIENT KILL TYPE replica`` (stopping alone
        would not do: the kernel would still take the stream in and the replica apply it on
        SIGCONT). Returns the replica's port. While stopped the replica answers nothing and the
        other nodes flag it as failing after the node timeout, so keep the pause short.
        """
        replica = self.replica_of(primary_port)
        _pause_replication(primary_port, self._nodes[replica])
        self._paused_replica[primary_port] = replica
        return replica

    def resume_replication(self, primary_port: int) -> None:
        """Undo :meth:`pause_replication`: SIGCONT the replica; if the primary still runs, wait until
        the replica has resynchronised (the writes made meanwhile are then kept)."""
        replica = self._paused_replica.pop(primary_port)
        _resume_replication(self._nodes[primary_port], self._nodes[replica])

    def lose_writes_then_failover(
        self, primary_port: int, write: Callable[[], None], rejoin: bool = True
    ) -> int:
        """Fail over ``primary_port`` so that the writes ``write()`` makes are acknowledged and lost.

        The sequence (module docstring): :meth:`pause_replication`, ``write()``, SIGKILL the
        primary, SIGCONT the replica, ``CLUSTER FAILOVER TAKEOVER`` on it (needs neither the dead
        primary nor a vote), wait until every live node routes the slots to it. With ``rejoin`` the
        old primary is restarted (empty, from its nodes.conf) and this returns once it replicates
        from the promoted node. Returns the promoted node's port.
        """
        ranges = self.slots_of(primary_port)
        replica = self.pause_replication(primary_port)
        try:
            write()
            self.kill(primary_port)
        finally:
            self.resume_replication(primary_port)
        with admin(replica) as r:
            r.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        self._wait_serves(replica, ranges)
        if rejoin:
            self.restart(primary_port)
            if self.replica_of(replica) != primary_port:
                raise RuntimeError(f"{primary_port} did not rejoin as a replica of {replica}")
        else:
            self.wait_settled()
        return replica


class LocalSentinel:
    """A primary, its replica (``--replicaof``) and three sentinels (quorum 2) watching them.

    Sentinels: ``down-after-milliseconds 2000``, ``failover-timeout 5000``. ``start()`` returns once
    every sentinel knows the primary, the replica and the two other sentinels, and the replica's
    link is up; so do ``failover()``, ``restart()`` and ``lose_writes_then_failover()``.
    """

    def __init__(self, service_name: str = "sqlcache-primary") -> None:
        self.service_name = service_name
        self.data_ports: list[int] = []
        self.sentinel_ports: list[int] = []
        self._nodes: dict[int, _Process] = {}
        self._base_argv: dict[int, list[str]] = {}  # data nodes, without --replicaof
        self._paused: tuple[int, int] | None = None  # (primary, SIGSTOPped replica)

    def _argv(self, port: int, following: int | None) -> list[str]:
        follow = [] if following is None else ["--replicaof", HOST, str(following)]
        return [*self._base_argv[port], *follow]

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        exe = _redis_server()
        taken: set[int] = set()

        def port() -> int:
            while True:
                p = free_port()
                if p not in taken:
                    taken.add(p)
                    return p

        primary, replica = port(), port()
        for p, following in ((primary, None), (replica, primary)):
            directory = tempfile.mkdtemp(prefix=f"sqlcache-topo-data-{p}-")
            argv = [
                exe,
                "--port", str(p),
                "--bind", HOST,
                "--save", "",
                "--appendonly", "no",
                "--repl-diskless-sync-delay", "0",
                "--dir", directory,
                "--logfile", os.path.join(directory, "redis.log"),
            ]  # fmt: skip
            self.data_ports.append(p)
            self._base_argv[p] = argv
            self._nodes[p] = _Process(p, self._argv(p, following), directory)
            self._nodes[p].start()
        # the replica linked before the sentinels' first INFO, so they learn of it at once
        _wait_caught_up(primary, replica, START_TIMEOUT)
        for _ in range(3):
            p = port()
            directory = tempfile.mkdtemp(prefix=f"sqlcache-topo-sentinel-{p}-")
            conf = os.path.join(directory, "sentinel.conf")
            with open(conf, "w", encoding="utf-8") as f:
                f.write(
                    f"port {p}\n"
                    f"bind {HOST}\n"
                    f"dir {directory}\n"
                    f"logfile {os.path.join(directory, 'redis.log')}\n"
                    f"sentinel monitor {self.service_name} {HOST} {primary} 2\n"
                    f"sentinel down-after-milliseconds {self.service_name} 2000\n"
                    f"sentinel failover-timeout {self.service_name} 5000\n"
                )
            self.sentinel_ports.append(p)
            self._nodes[p] = _Process(p, [exe, conf, "--sentinel"], directory)
            self._nodes[p].start()
        self.wait_settled(START_TIMEOUT)

    def stop(self) -> None:
        """Kill every process by PID and remove the directories (idempotent)."""
        for node in self._nodes.values():
            node.kill()
        for node in self._nodes.values():
            shutil.rmtree(node.dir, ignore_errors=True)
        self._nodes.clear()
        self._base_argv.clear()
        self.data_ports.clear()
        self.sentinel_ports.clear()

    def __enter__(self) -> LocalSentinel:
        try:
            self.start()
        except BaseException:  # pytest's skip included: nothing may be left running
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- clients and views ---------------------------------------------------------------------

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, p) for p in self.sentinel_ports]

    def sentinel(self, **kwargs: Any) -> Sentinel:
        """A ``redis.sentinel.Sentinel`` on the three sentinels (2 s timeouts); the caller closes it."""
        options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2, **kwargs}
        return Sentinel(self.sentinel_addresses, **options)

    def node(self, port: int) -> redis.Redis:
        """A plain client for one node (strings, 2 s timeout); the caller closes it."""
        return admin(port, timeout=2)

    def _reported(self) -> list[int]:
        """The primary port each reachable sentinel reports."""
        ports = []
        for s in self.sentinel_ports:
            if self._nodes[s].reachable:
                with admin(s) as r:
                    _host, port = r.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
                ports.append(int(port))
        return ports

    def primary_port(self) -> int:
        """The primary's port as most sentinels currently report it."""
        reported = self._reported()
        for port in set(reported):
            if reported.count(port) * 2 > len(self.sentinel_ports):
                return port
        raise RuntimeError(f"the sentinels do not agree on a primary: {reported}")

    def replica_port(self) -> int:
        """The data node that is not the reported primary."""
        primary = self.primary_port()
        return next(p for p in self.data_ports if p != primary)

    # --- waiting -------------------------------------------------------------------------------

    def _problem(self) -> str | None:
        reported = self._reported()
        if len(set(reported)) != 1 or len(reported) != len(self.sentinel_ports):
            return f"sentinels report primaries {reported}"
        primary = reported[0]
        replica = next(p for p in self.data_ports if p != primary)
        if _replication(primary)["role"] != "master":
            return f"reported primary {primary} is not a master"
        repl = _replication(replica)
        if repl["role"] != "slave" or int(repl["master_port"]) != primary:
            return f"{replica} is {repl['role']}, not a replica of {primary}"
        if repl.get("master_link_status") != "up" or int(repl.get("master_sync_in_progress", 0)):
            return f"replica {replica}: link {repl.get('master_link_status')}"
        for s in self.sentinel_ports:
            with admin(s) as r:
                master = _pairs(r.execute_command("SENTINEL", "MASTER", self.service_name))
                replicas = [_pairs(x) for x in r.execute_command("SENTINEL", "REPLICAS", self.service_name)]
            if master.get("flags") != "master":
                return f"sentinel {s}: primary flags {master.get('flags')}"
            if int(master["num-other-sentinels"]) != 2 or int(master["num-slaves"]) != 1:
                return (
                    f"sentinel {s} knows {master['num-other-sentinels']} other sentinels "
                    f"and {master['num-slaves']} replicas"
                )
            states = {int(x["port"]): str(x["flags"]) for x in replicas}
            if states.get(replica) != "slave":
                return f"sentinel {s} sees replica {replica} as {states.get(replica)}"
        return None

    def wait_settled(self, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Until all sentinels report one primary that is a master, the other node replicates from it
        with its link up, and every sentinel knows both nodes (healthy) and two other sentinels."""
        wait_until(self._problem, timeout, "the sentinel setup to settle")

    def _wait_promoted(self, new_primary: int) -> None:
        def promoted() -> str | None:
            reported = self._reported()
            if set(reported) != {new_primary} or len(reported) != len(self.sentinel_ports):
                return f"sentinels report {reported}"
            role = _replication(new_primary)["role"]
            return None if role == "master" else f"{new_primary} is {role}"

        wait_until(promoted, FAILOVER_TIMEOUT, f"the sentinels to promote {new_primary}")

    # --- faults --------------------------------------------------------------------------------

    def failover(self, settle: bool = True) -> int:
        """``SENTINEL FAILOVER``; returns the new primary's port.

        Waits first until the replica has the primary's writes, then until every sentinel reports
        the former replica as primary and it has ``role:master``, then (``settle``) until the sentinels
        have turned the former primary into its replica (they wait about 8 s before doing so, and the
        former primary is a master meanwhile: call :meth:`wait_settled` afterwards).
        """
        old = self.primary_port()
        new = self.replica_port()
        _wait_caught_up(old, new)

        def started() -> str | None:
            try:
                with admin(self.sentinel_ports[0]) as r:
                    r.execute_command("SENTINEL", "FAILOVER", self.service_name)
            except redis.ResponseError as exc:  # NOGOODSLAVE/INPROG: not ready yet, ask again
                return str(exc)
            return None

        wait_until(started, FAILOVER_TIMEOUT, "a sentinel to accept SENTINEL FAILOVER")
        self._wait_promoted(new)
        if settle:
            self.wait_settled()
        return new

    def kill(self, port: int) -> None:
        """SIGKILL the process (data node or sentinel) by PID and reap it.

        A data node's restart command line is fixed here to the role it had when killed, as the
        sentinels' CONFIG REWRITE would have left its config file: a replica comes back with
        ``--replicaof`` its primary, a primary comes back as a master.
        """
        if port in self._base_argv:
            self._nodes[port].argv = self._argv(port, self._following(port))
        self._nodes[port].kill()

    def _following(self, port: int) -> int | None:
        """The primary ``port`` replicates from, None for a primary (the sentinels' view if it is stopped)."""
        if self._nodes[port].reachable:
            try:
                repl = _replication(port)
                return int(repl["master_port"]) if repl["role"] == "slave" else None
            except redis.RedisError:
                pass
        primary = self.primary_port()
        return None if primary == port else primary

    def restart(self, *ports: int) -> None:
        """Start killed processes again (same directory; a data node comes back empty, in the role
        it had when killed); returns once each answers and the setup is settled. An old primary is
        turned into a replica by the sentinels, about 8-10 s after it is back."""
        for port in ports:
            if not self._nodes[port].alive:
                self._nodes[port].start()
        self.wait_settled()

    def pause_replication(self) -> int:
        """From now on the primary acknowledges writes its replica does not receive.

        As :meth:`LocalCluster.pause_replication`: the replica is SIGSTOPped and the link closed on
        the primary. Returns the replica's port. The sentinels flag the stopped replica as down
        after 2 s, so keep the pause short.
        """
        primary = self.primary_port()
        replica = self.replica_port()
        _pause_replication(primary, self._nodes[replica])
        self._paused = (primary, replica)
        return replica

    def resume_replication(self) -> None:
        """Undo :meth:`pause_replication`: SIGCONT the replica; if the primary still runs, wait until
        the replica has resynchronised (the writes made meanwhile are then kept)."""
        if self._paused is None:
            raise RuntimeError("replication is not paused")
        primary, replica = self._paused
        self._paused = None
        _resume_replication(self._nodes[primary], self._nodes[replica])

    def lose_writes_then_failover(self, write: Callable[[], None]) -> int:
        """Fail over so that the writes ``write()`` makes are acknowledged and lost.

        The sequence (module docstring): :meth:`pause_replication`, ``write()``, SIGKILL the
        primary, SIGCONT the replica; the sentinels see the primary down and promote the replica;
        the old primary is restarted (empty, as a master) and this returns once the sentinels have
        made it a replica of the promoted node (about 10 s). Returns the promoted node's port.
        """
        old = self.primary_port()
        new = self.pause_replication()
        try:
            write()
            self.kill(old)
        finally:
            self.resume_replication()
        self._wait_promoted(new)
        self.restart(old)
        return new


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    """A running :class:`LocalCluster` for the module; stopped and removed afterwards."""
    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def local_sentinel() -> Iterator[LocalSentinel]:
    """A running :class:`LocalSentinel` for the module; stopped and removed afterwards."""
    with LocalSentinel() as setup:
        yield setup
