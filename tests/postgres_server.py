"""A throw-away PostgreSQL server in a temporary folder, reachable only through its Unix socket."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PORT = 5432  # only names the socket file, inside a private folder; no TCP port is opened


def pg_bin() -> Path | None:
    """The newest installed server's bin folder (Debian's postgresql package), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server with initdb/pg_ctl and yield its SQLAlchemy URL; stop and delete it after."""
    bindir = pg_bin()
    assert bindir is not None, "PostgreSQL is not installed (apt-get install postgresql)"
    # PostgreSQL refuses to run as root; CI runs as root, so the server runs as 'postgres'.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="mendd-pg-"))
    if as_user:
        entry = pwd.getpwnam("postgres")
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    data = folder / "data"
    try:
        _run(as_user, bindir / "initdb", "-D", str(data), "-U", "mendd", "--auth=trust", "-E", "UTF8")
        options = f"-k {folder} -c listen_addresses='' -p {PORT} -c fsync=off"
        _run(as_user, bindir / "pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
        try:
            yield f"postgresql+psycopg://mendd@/postgres?host={folder}&port={PORT}"
        finally:
            _run(as_user, bindir / "pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(as_user: list[str], program: Path, *args: str) -> None:
    result = subprocess.run([*as_user, str(program), *args], capture_output=True, text=True, timeout=120, cwd="/")
    if result.returncode != 0:
        raise RuntimeError(f"{program.name} failed: {result.stderr or result.stdout}")
