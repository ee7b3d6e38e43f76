"""A real PostgreSQL (Debian's postgresql package) for the tests: a fresh cluster in a temporary
folder, on a free port, owned by the `postgres` user when the tests run as root (CI)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

import pytest


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


class Postgres:
    def __init__(self, port: int):
        binary = pg_bin()
        if binary is None:
            pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        self.bin, self.port = binary, port
        self.dir = tempfile.mkdtemp(prefix="sonic-pg-")
        self.as_user = []
        if os.geteuid() == 0:                      # postgres refuses to run as root
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        data = os.path.join(self.dir, "data")
        self._run("initdb", "-D", data, "-U", "sonic", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60", "-o",
                  f"-p {port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
                  "start")
        self.data = data
        self.url = f"postgresql://sonic@127.0.0.1:{port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        out = subprocess.run([*self.as_user, os.path.join(self.bin, tool), *args], capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            pytest.fail(f"{tool} failed: {out.stderr[-1500:]}")

    def new_database(self) -> str:
        import psycopg
        name = f"t{int(time.time() * 1e6)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=sonic dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql://sonic@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self.as_user, os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
