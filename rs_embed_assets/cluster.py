"""The distributed profile on one machine: Postgres + Redis + Celery workers + Dagster daemon/webserver.

``rs-embed-assets cluster up | down | status`` starts and stops, on 127.0.0.1 only:

- PostgreSQL (Debian ``postgresql``: ``initdb``/``pg_ctl``) as Dagster's instance storage, through
  dagster-postgres with the ``postgresql+psycopg2`` driver (SQLAlchemy 2.1 otherwise picks psycopg 3,
  which is not installed);
- Redis (Debian ``redis-server``) as the Celery broker and result backend;
- two Celery workers of the dagster-celery executor: ``gpu@<host>`` on queue ``gpu`` (one step at a
  time: one GPU) and ``imagery@<host>`` on queues ``imagery`` and ``dagster`` (the default queue of
  checkpoint and catalog steps); queue names come from rs_embed_assets.routing;
- ``dagster-daemon`` (queued runs, backfills, run monitoring) and ``dagster-webserver``.

Everything lives under one state directory (``RS_EMBED_ASSETS_CLUSTER_DIR``, default ``./.cluster``):
``dagster_home/`` (dagster.yaml = the shipped one + Postgres storage), ``pg/``, ``redis/``,
``celery/`` (the workers' config module), ``logs/`` and ``pids/``; ``env.sh`` exports what a shell
needs to talk to the cluster (``source .cluster/env.sh``). Ports: RS_EMBED_ASSETS_PG_PORT (15432),
RS_EMBED_ASSETS_REDIS_PORT (16379), RS_EMBED_ASSETS_WEBSERVER_PORT (13300).
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import routing

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_USER = "dagster"
PG_DB = "dagster"


class ClusterError(RuntimeError):
    """The cluster cannot start; the message names what is missing and how to get it."""


@dataclass(frozen=True)
class Cluster:
    root: Path
    pg_port: int = 15432
    redis_port: int = 16379
    webserver_port: int = 13300

    @classmethod
    def from_env(cls) -> "Cluster":
        env = os.environ
        return cls(root=Path(env.get("RS_EMBED_ASSETS_CLUSTER_DIR", ".cluster")).resolve(),
                   pg_port=int(env.get("RS_EMBED_ASSETS_PG_PORT", "15432")),
                   redis_port=int(env.get("RS_EMBED_ASSETS_REDIS_PORT", "16379")),
                   webserver_port=int(env.get("RS_EMBED_ASSETS_WEBSERVER_PORT", "13300")))

    # --- layout -------------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def broker(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def pg_url(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.pg_port}/{PG_DB}"

    def env(self) -> dict[str, str]:
        """Environment of every cluster process (and of a shell that talks to it)."""
        celery_dir = str(self.root / "celery")
        pythonpath = os.pathsep.join(p for p in (celery_dir, str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "DAGSTER_HOME": str(self.home), "RS_EMBED_ASSETS_EXECUTOR": "celery",
                "RS_EMBED_ASSETS_CELERY_BROKER": self.broker, "RS_EMBED_ASSETS_CELERY_BACKEND": self.broker,
                "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "1", "PYTHONPATH": pythonpath,
                "PYTHONUNBUFFERED": "1"}

    def worker_names(self) -> dict[str, str]:
        r = routing.Routing.from_env()
        host = socket.gethostname()
        return {f"gpu@{host}": r.gpu_queue, f"imagery@{host}": f"{r.imagery_queue},dagster"}

    # --- up -----------------------------------------------------------------------------------
    def up(self) -> None:
        for d in ("logs", "pids", "celery", "redis", "dagster_home"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._start_postgres()
        self._start_redis()
        self._write_instance()
        self._set_pools()
        bin_dir = Path(sys.executable).parent
        for name, queues in self.worker_names().items():
            kind = name.split("@")[0]
            self._spawn(f"worker-{kind}", [str(bin_dir / "celery"), "-A", "dagster_celery.app", "worker",
                                           "-Q", queues, "-n", name, "--concurrency", "1" if kind == "gpu" else "2",
                                           "--prefetch-multiplier=1", "-l", "INFO", "--without-gossip",
                                           "--without-mingle"])
        workspace = str(REPO_ROOT / "workspace.yaml")
        self._spawn("daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", workspace])
        self._spawn("webserver", [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1",
                                  "-p", str(self.webserver_port)])
        self._wait_workers()

    def _pg_bin(self, name: str) -> str:
        found = shutil.which(name)
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
        if candidates:  # prefer the Debian package's own binaries (a wrapper on PATH may need a cluster)
            return candidates[0]
        if found:
            return found
        raise ClusterError(f"{name} not found: install PostgreSQL (Debian: apt-get install -y postgresql)")

    def _as_db_user(self, argv: list[str]) -> list[str]:
        """PostgreSQL refuses to run as root: run its binaries as the ``postgres`` system user then."""
        if os.geteuid() != 0:
            return argv
        runuser = shutil.which("runuser")
        if not runuser:
            raise ClusterError("running as root needs `runuser` to start PostgreSQL as the postgres user")
        return [runuser, "-u", "postgres", "--", *argv]

    def _start_postgres(self) -> None:
        pg = self.root / "pg"
        data, sock = pg / "data", pg / "socket"
        if not (data / "PG_VERSION").exists():
            pg.mkdir(parents=True, exist_ok=True)
            sock.mkdir(exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(pg, "postgres")
                shutil.chown(sock, "postgres")
            _run(self._as_db_user([self._pg_bin("initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust",
                                   "-E", "UTF8", "--no-instructions"]), "initdb")
        if _pg_ready(self.pg_port):
            return
        log = pg / "postgres.log"
        if os.geteuid() == 0 and log.exists():
            shutil.chown(log, "postgres")
        _run(self._as_db_user([self._pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                               f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -k {sock} -c fsync=off "
                               "-c max_connections=200", "start"]), "pg_ctl start")
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=PG_USER, dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {PG_DB}")
        con.close()

    def _start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise ClusterError("redis-server not found: install Redis (Debian: apt-get install -y redis-server)")
        if _port_open(self.redis_port):
            return
        rd = self.root / "redis"
        _run([exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--daemonize", "yes",
              "--pidfile", str(self.root / "pids" / "redis.pid"), "--logfile", str(self.root / "logs" / "redis.log"),
              "--dir", str(rd), "--save", "", "--appendonly", "no"], "redis-server")
        _wait(lambda: _port_open(self.redis_port), 30, "redis-server to listen")

    def _write_instance(self) -> None:
        shipped = (REPO_ROOT / "dagster.yaml").read_text()
        storage = f"""
# --- added by `rs-embed-assets cluster up`: Postgres instance storage (psycopg2 driver) ---
storage:
  postgres:
    postgres_db:
      hostname: 127.0.0.1
      port: {self.pg_port}
      username: {PG_USER}
      db_name: {PG_DB}
      scheme: postgresql+psycopg2
"""
        (self.home / "dagster.yaml").write_text(shipped + storage)
        (self.root / "celery" / "dagster_celery_config.py").write_text(
            "# Celery settings of the dagster-celery workers (written by `rs-embed-assets cluster up`)\n"
            f"broker_url = {self.broker!r}\nresult_backend = {self.broker!r}\n"
            "worker_prefetch_multiplier = 1\n"
            "task_acks_late = False  # a step whose worker dies is not redelivered: the run fails, re-execute it\n"
            "worker_cancel_long_running_tasks_on_connection_loss = True\n")
        lines = [f"export {k}={v!r}" for k, v in self.env().items()
                 if k in ("DAGSTER_HOME", "RS_EMBED_ASSETS_EXECUTOR", "RS_EMBED_ASSETS_CELERY_BROKER",
                          "RS_EMBED_ASSETS_CELERY_BACKEND", "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS",
                          "PYTHONPATH")]
        (self.root / "env.sh").write_text("\n".join(lines) + "\n")

    def _set_pools(self) -> None:
        out = subprocess.run([sys.executable, "-c", (
            "import dagster as dg\n"
            "i = dg.DagsterInstance.get()\n"
            "for pool, n in (('gpu', 1), ('imagery', 4), ('duckdb_writer', 1)):\n"
            "    i.event_log_storage.set_concurrency_slots(pool, n)\n")], env=self.env(), capture_output=True,
            text=True)
        if out.returncode:
            raise ClusterError(f"could not initialise the Postgres instance storage: {out.stderr[-2000:]}")

    def _spawn(self, name: str, argv: list[str]) -> None:
        pidfile = self.root / "pids" / f"{name}.pid"
        if pidfile.exists() and _alive(int(pidfile.read_text())):
            return
        log = open(self.root / "logs" / f"{name}.log", "a")
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_signals)
        pidfile.write_text(str(proc.pid))

    def _wait_workers(self, timeout: float = 180) -> None:
        names = set(self.worker_names())

        def ready() -> bool:
            return names <= set(self.celery_ping())

        _wait(ready, timeout, f"Celery workers {sorted(names)} to answer a ping (see {self.root / 'logs'})")

    def celery_ping(self) -> list[str]:
        from celery import Celery

        app = Celery(broker=self.broker, backend=self.broker)
        try:
            replies = app.control.ping(timeout=2.0) or []
        finally:
            app.close()
        return [name for reply in replies for name in reply]

    # --- down / status ------------------------------------------------------------------------
    def down(self) -> None:
        for name in ("webserver", "daemon", "worker-gpu", "worker-imagery"):
            pidfile = self.root / "pids" / f"{name}.pid"
            if pidfile.exists():
                _stop_group(int(pidfile.read_text()))
                pidfile.unlink()
        redis_pid = self.root / "pids" / "redis.pid"
        if redis_pid.exists():
            _stop_group(int(redis_pid.read_text()), group=False)
            redis_pid.unlink(missing_ok=True)
        data = self.root / "pg" / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run(self._as_db_user([self._pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                           capture_output=True)

    def status(self) -> dict[str, str]:
        out = {"postgres": f"up on 127.0.0.1:{self.pg_port}" if _pg_ready(self.pg_port) else "down",
               "redis": f"up on 127.0.0.1:{self.redis_port}" if _port_open(self.redis_port) else "down"}
        for name in ("worker-gpu", "worker-imagery", "daemon", "webserver"):
            pidfile = self.root / "pids" / f"{name}.pid"
            pid = int(pidfile.read_text()) if pidfile.exists() else None
            out[name] = f"up (pid {pid})" if pid and _alive(pid) else "down"
        if out["webserver"] != "down":
            out["webserver"] += f" http://127.0.0.1:{self.webserver_port}"
        return out


def _default_signals():  # the parent may ignore SIGTERM/SIGINT; the services must not
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(argv: list[str], what: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode:
        raise ClusterError(f"{what} failed ({' '.join(argv[:3])} …): {(out.stderr or out.stdout)[-2000:]}")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pg_ready(port: int) -> bool:
    if not _port_open(port):
        return False
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres", connect_timeout=2).close()
        return True
    except Exception:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return not open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def _stop_group(pid: int, group: bool = True, timeout: float = 20) -> None:
    kill = os.killpg if group else os.kill
    try:
        kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline and _alive(pid):
        time.sleep(0.3)
    if _alive(pid):
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(action: str) -> int:
    cluster = Cluster.from_env()
    try:
        if action == "up":
            cluster.up()
            print(f"cluster up in {cluster.root} (user {getpass.getuser()}); `source {cluster.root / 'env.sh'}`")
        elif action == "down":
            cluster.down()
            print("cluster down")
            return 0
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, state in cluster.status().items():
        print(f"{name:15s} {state}")
    return 0
