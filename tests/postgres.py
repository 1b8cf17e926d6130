"""A throwaway PostgreSQL server for tests: its own data directory, a free loopback port, trust auth for "aimass".

``initdb`` and the server refuse to run as root. Run as root (as in CI containers), the binaries run as the
``postgres`` user instead, in a directory of their own under /tmp: pytest's directories are private to root (0700),
so the server could not reach a data directory there. The server log is
copied into ``base_dir`` when the server stops, for post-mortems.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from aimass.local_mesh import free_port

START_TIMEOUT_S = 30.0
USER = "aimass"
DATABASE = "aimass"
_RUN_AS = "postgres"  # the Debian packages' system user, which runs the server when we are root


def postgres_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: where ``initdb`` is on PATH (symlinks followed, as Debian's
    /usr/local/bin links point into the versioned directory), else the newest /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
        candidates.append(Path(found).parent)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    return None


def _as_server_user(argv: Sequence[str]) -> list[str]:
    return ["runuser", "-u", _RUN_AS, "--", *argv] if os.geteuid() == 0 else list(argv)


def _run(argv: Sequence[str], cwd: Path, timeout_s: float = 60.0) -> None:
    done = subprocess.run(_as_server_user(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError as error:
        return f"(no server log: {error})"


@contextlib.contextmanager
def _work_dir(base_dir: Path) -> Iterator[Path]:
    """Where the data directory, the socket and the log go: inside ``base_dir``, or (root) a directory of the
    ``postgres`` user under /tmp, removed afterwards."""
    if os.geteuid() != 0:
        work = base_dir / "postgres"
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    try:
        pwd.getpwnam(_RUN_AS)
    except KeyError:
        raise RuntimeError(
            f"running as root, and PostgreSQL refuses root: it runs as the {_RUN_AS!r} user, which does not exist here"
        ) from None
    # /tmp itself: the system temporary directory may be private (TMPDIR), and /tmp is reachable by every user.
    work = Path(tempfile.mkdtemp(prefix="aimass-pg-", dir="/tmp"))
    try:
        shutil.chown(work, _RUN_AS, _RUN_AS)
        reachable = subprocess.run(_as_server_user(["test", "-w", str(work), "-a", "-x", str(work)]), check=False)
        if reachable.returncode != 0:
            raise RuntimeError(f"the {_RUN_AS!r} user cannot write to {work}; PostgreSQL cannot run there")
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(base_dir: Path) -> Iterator[str]:
    """Starts a PostgreSQL server for the test's lifetime and yields its SQLAlchemy URL
    (``postgresql+psycopg://aimass@127.0.0.1:PORT/aimass``); always stops it."""
    # The "postgres" extra; imported here so that importing this module never needs it.
    import psycopg
    from psycopg import sql

    binaries = postgres_binaries()
    if binaries is None:
        raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found")
    base_dir.mkdir(parents=True, exist_ok=True)
    with _work_dir(base_dir) as work:
        data, log = work / "data", work / "server.log"
        port = free_port()
        # No fsync: a throwaway server, and initdb plus the tests run several times faster.
        initdb = [str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "-E", "UTF8", "--locale=C"]
        _run([*initdb, "--no-sync", "--no-instructions"], cwd=work)
        options = (
            f"-p {port} -k {shlex.quote(str(work))} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        )
        pg_ctl = str(binaries / "pg_ctl")
        try:
            # -w: pg_ctl waits until the server is up, and notices at once when it exits instead (a port taken).
            start = subprocess.run(
                _as_server_user([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "30", "start"]),
                cwd=work,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S + 10,
            )
            if start.returncode != 0:
                raise RuntimeError(
                    f"PostgreSQL did not start on 127.0.0.1:{port} ({start.stdout.strip()} {start.stderr.strip()}); "
                    f"server log:\n{_log_tail(log)}"
                )
            admin = f"host=127.0.0.1 port={port} user={USER} dbname=postgres connect_timeout=2"
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    with psycopg.connect(admin, autocommit=True) as conn:
                        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
                    break
                except psycopg.OperationalError as error:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"PostgreSQL on 127.0.0.1:{port} did not accept connections within {START_TIMEOUT_S:.0f} "
                            f"s ({error}); server log:\n{_log_tail(log)}"
                        ) from error
                    time.sleep(0.1)
            yield f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            # Also after a failed or timed-out start: a server may be up all the same.
            stop = [pg_ctl, "-D", str(data), "-w", "-t", "30", "stop", "-m"]
            stopped = subprocess.run(_as_server_user([*stop, "fast"]), cwd=work, capture_output=True, check=False)
            if stopped.returncode != 0 and (data / "postmaster.pid").exists():
                subprocess.run(_as_server_user([*stop, "immediate"]), cwd=work, capture_output=True, check=False)
            with contextlib.suppress(OSError):
                shutil.copyfile(log, base_dir / "postgres.log")


def create_database(server_url: str, name: str) -> str:
    """A new empty database on the server of ``server_url`` (one from ``postgres_server``); returns its URL."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"database name {name!r} is not a plain lowercase identifier")
    url = make_url(server_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)
