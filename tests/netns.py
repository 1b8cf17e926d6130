"""Hosts for tests, made of Linux network namespaces: each its own network stack, hostname and port space.

``hosts(["gw", "host-a", "host-b"])`` builds, as root with iproute2:

- one namespace per host with ``lo`` up and an ``eth0`` holding a private address (10.213.0.10, .11, ...);
- a dedicated *switch* namespace holding a bridge, with the other end of every host's veth pair plugged in.

Nothing is added to the root namespace (no bridge, no veth, no route), so the machine's own networking is
untouched, and the subnet cannot clash with a route there: every namespace has its own routing table. Parallel or
aborted runs cannot collide either: names carry the creating pid and a random token, and namespaces left by a run
whose process is gone (a killed pytest) are removed the next time. Processes start in a host with ``run_in``
(``ip netns exec``, plus ``unshare --uts`` so each host has its own hostname, as separate machines do); on exit,
every process still in a namespace is killed and every namespace deleted, whatever happened in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

import pytest

log = logging.getLogger(__name__)

PREFIX = "aimass-t"
# Host n (from 0) gets SUBNET.(FIRST_HOST + n)/24; the switch namespace holds no address.
SUBNET = "10.213.0"
FIRST_HOST = 10
KILL_WAIT_S = 5.0
_STALE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")


def require_netns() -> None:
    """Skip the calling test where namespaces cannot be made: not root, or iproute2/util-linux missing."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root with iproute2)")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            pytest.skip(f"network namespaces need `{tool}` ({package})")


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def namespace_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def pids_in(namespace: str) -> list[int]:
    try:
        return [int(pid) for pid in _ip("netns", "pids", namespace).split()]
    except RuntimeError:
        return []  # already gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_all_in(namespace: str) -> None:
    for pid in pids_in(namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _delete(namespaces: Sequence[str]) -> list[str]:
    """Kill what runs in ``namespaces`` and delete them; returns the errors (teardown goes on past each)."""
    errors = []
    for namespace in namespaces:
        _kill_all_in(namespace)
    deadline = time.monotonic() + KILL_WAIT_S
    while any(pids_in(ns) for ns in namespaces) and time.monotonic() < deadline:
        time.sleep(0.05)
    for namespace in namespaces:
        try:
            _ip("netns", "delete", namespace)
        except RuntimeError as err:
            if namespace in namespace_names():
                errors.append(str(err))
    return errors


def reap_stale() -> None:
    """Delete namespaces that an earlier run left behind (its process is gone); live runs' are left alone."""
    stale = [ns for ns in namespace_names() if (m := _STALE.match(ns)) and not _alive(int(m.group(1)))]
    if stale:
        log.warning("removing network namespaces left by earlier runs: %s", ", ".join(stale))
        _delete(stale)


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    ip: str
    # The host's port on the switch (the veth end in the switch namespace).
    port: str


@dataclass
class Hosts:
    """Hosts by name, and the processes started in them."""

    hosts: dict[str, Host]
    switch: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def unplug(self, host: str) -> None:
        """Pull ``host``'s cable: its packets go nowhere and nothing tells its peers (no RST, no FIN), as when a
        machine loses power or the network splits; its processes run on."""
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "down")

    def plug(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "up")

    def run_in(
        self,
        host: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = subprocess.STDOUT,
        stdin: IO[bytes] | int | None = subprocess.DEVNULL,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """``argv`` in ``host``'s namespace, with the hostname ``host``. Neither `ip netns exec` nor `unshare`
        (without --fork) nor the shell forks: each execs the next, so the Popen's pid is ``argv``'s process."""
        target = self.hosts[host]
        command = [
            "ip",
            "netns",
            "exec",
            target.namespace,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            host,
            *argv,
        ]
        process = subprocess.Popen(command, env=dict(env), stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd)
        self.processes.append(process)
        return process


def _build(names: Sequence[str], token: str) -> Hosts:
    switch = f"{PREFIX}{os.getpid()}-{token}-switch"
    _ip("netns", "add", switch)
    built = Hosts({}, switch)
    _ip("-n", switch, "link", "add", "br0", "type", "bridge")
    _ip("-n", switch, "link", "set", "br0", "up")
    for index, name in enumerate(names):
        namespace = f"{PREFIX}{os.getpid()}-{token}-{name}"
        _ip("netns", "add", namespace)
        address = f"{SUBNET}.{FIRST_HOST + index}"
        port = f"p{index}"
        built.hosts[name] = Host(name, namespace, address, port)
        # Both ends are made where they live: the root namespace never holds either.
        _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
    return built


@contextlib.contextmanager
def hosts(names: Sequence[str]) -> Iterator[Hosts]:
    """Namespaces as hosts on one private switch; everything is removed on exit, processes included."""
    if len(set(names)) != len(names) or len(names) > 200:
        raise ValueError(f"host names must be unique and at most 200: {names}")
    reap_stale()
    token = secrets.token_hex(3)
    built: Hosts | None = None
    try:
        built = _build(names, token)
        yield built
    finally:
        ours = [ns for ns in namespace_names() if ns.startswith(f"{PREFIX}{os.getpid()}-{token}-")]
        errors = _delete(ours)
        for process in built.processes if built is not None else ():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=KILL_WAIT_S)
        if errors:
            raise RuntimeError("could not remove network namespaces: " + "; ".join(errors))
