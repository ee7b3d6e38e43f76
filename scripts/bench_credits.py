"""Credits figures (docs/credits.md): a recharge of 1,000 accounts in one call (atomic and soft),
and reserve + charge pairs per second when many threads charge the same account, on SQLite and
on a PostgreSQL cluster this script starts (Debian's postgresql, a free port).

    PYTHONPATH=tests .venv/bin/python scripts/bench_credits.py [--threads 8] [--seconds 5]
(tests/ on PYTHONPATH: its helpers start the services measured; the package is the installed
one.) Check `uptime` first: time only on a quiet machine.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time



def bench(url: str, threads: int, seconds: float) -> None:
    from sqlalchemy import insert
    from sonic_server.accounts import Ledger
    from sonic_server.accounts.schema import accounts
    ledger = Ledger(url)
    with ledger.engine.begin() as c:
        c.execute(insert(accounts), [dict(name=f"a{i}", role="user", balance=0, created=time.time())
                                     for i in range(1000)])
    names = [f"a{i}" for i in range(1000)]
    for mode in ("atomic", "soft"):
        t0 = time.perf_counter()
        status, answer = ledger.recharge(names, 100, "bench", mode, "bench")
        took = time.perf_counter() - t0
        assert status == 200 and len(answer["succeeded"]) == 1000
        print(f"  recharge of 1,000 accounts, {mode}: {took * 1000:.0f} ms")
    ledger.recharge(["a0"], 100_000_000, "bench: room for the charges", "atomic", "bench")
    count = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def charge(t: int) -> None:
        i = 0
        while time.monotonic() < stop:
            job = f"t{t}-{i}"
            ok, _ = ledger.reserve(1, job, 2, "bench")
            assert ok
            ledger.settle(job, True, 1)
            i += 1
        with lock:
            count[0] += i
    workers = [threading.Thread(target=charge, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"  {threads} threads charging one account: {count[0] / seconds:.0f} jobs/s "
          f"(a hold and a settlement each: {2 * count[0] / seconds:.0f} transactions/s)")
    bad = ledger.check()
    print(f"  ledger check: {'ok' if not bad else bad}; balance of the charged account "
          f"{ledger.account('a0')['balance']} = 100000200 - {count[0]}")
    ledger.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("SQLite (WAL, a file on the local disk):")
        bench(f"sqlite:///{tmp}/bench.sqlite3", a.threads, a.seconds)
    from pg_helpers import Postgres
    from test_http_live import free_port
    pg = Postgres(free_port())
    try:
        print("PostgreSQL (a local cluster, fsync off):")
        bench(pg.new_database().replace("postgresql://", "postgresql+psycopg://"), a.threads, a.seconds)
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
