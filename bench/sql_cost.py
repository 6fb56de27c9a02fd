"""What one call of record_usage costs the database, against the SQL floor: exact and repeatable.

    python bench/sql_cost.py [--calls 300]      (needs valgrind: apt-get install valgrind)

Timings on a shared 2-core machine drift by 10-20% from one minute to the next; instruction
counts do not. This migrates an embedded Postgres (pgserver) with the real migrations, seeds one
subscribed organisation as bench/hot_path.py does, then restarts the same server under
callgrind and counts the instructions of one connection's backend making N calls against one
making 100, for the floor (an idempotent insert and an atomic increment) and for
public.record_usage: (Ir(N + 100) - Ir(100)) / N per call, connection start and warm-up excluded.
fsync is off (the disk is not what is counted).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pgserver
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hot_path import (  # noqa: E402
    FLOOR_CALL,
    FLOOR_SQL,
    RECORD_USAGE_CALL,
    migrated_database,
    seed,
)

BIN = Path(pgserver.__file__).parent / "pginstall" / "bin"


def instructions(socket: Path, out: Path, statement: str, calls: int) -> int:
    """The instructions one new backend spent on `calls` calls of `statement` (and its start)."""
    with psycopg.connect(host=str(socket), dbname="bench", user="postgres", autocommit=True) as c:
        row = c.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        for _ in range(calls):
            c.execute(statement)
    report = out / f"callgrind.{row[0]}"
    for _ in range(600):  # callgrind writes the file when the backend exits
        if report.exists() and "totals:" in report.read_text(errors="ignore"):
            break
        time.sleep(0.2)
    found = re.search(r"^totals: (\d+)", report.read_text(errors="ignore"), re.MULTILINE)
    if found is None:
        raise SystemExit(f"callgrind wrote no totals to {report}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls measured per statement")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install valgrind, then run this again")
        return 2
    with tempfile.TemporaryDirectory(prefix="mb-sql-cost-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        server = pgserver.get_server(str(work / "pg"), cleanup_mode=None)
        url = migrated_database(server)
        with psycopg.connect(url, autocommit=True) as conn:
            org = seed(conn)
            conn.execute(FLOOR_SQL)
            floor_org = str(uuid.uuid4())
            conn.execute("insert into bench_floor.totals values (%s, 0)", (floor_org,))
        statements = {
            "SQL floor (insert + increment)": FLOOR_CALL.format(org=floor_org),
            "public.record_usage": RECORD_USAGE_CALL.format(org=org),
        }
        # The same data directory, now under callgrind (as the user pgserver made it for).
        pgdata = work / "pg"
        owner = pgdata.owner()
        as_owner = ["runuser", "-u", owner, "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*as_owner, str(BIN / "pg_ctl"), "-D", str(pgdata), "-w", "stop"],
            check=True,
            capture_output=True,
        )
        socket, out = work / "socket", work / "callgrind"
        for folder in (socket, out):
            folder.mkdir()
            folder.chmod(0o777)
        postmaster = subprocess.Popen(
            [
                *as_owner,
                "valgrind",
                "--tool=callgrind",
                "--trace-children=yes",
                f"--callgrind-out-file={out}/callgrind.%p",
                str(BIN / "postgres"),
                *("-D", str(pgdata), "-k", str(socket), "-h", ""),
                *("-c", "fsync=off", "-c", "autovacuum=off"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(600):
                with contextlib.suppress(psycopg.OperationalError):
                    psycopg.connect(host=str(socket), dbname="bench", user="postgres").close()
                    break
                time.sleep(0.5)
            costs = {}
            for name, statement in statements.items():
                instructions(socket, out, statement, 30)  # the database's catalogues, warmed
                few = instructions(socket, out, statement, 100)
                many = instructions(socket, out, statement, 100 + args.calls)
                costs[name] = (many - few) / args.calls
        finally:
            postmaster.terminate()
            postmaster.wait(timeout=60)
    floor = costs["SQL floor (insert + increment)"]
    print(f"Instructions per call in the Postgres backend (callgrind, {args.calls} calls each)")
    for name, cost in costs.items():
        print(f"  {name:32} {cost / 1000:8.1f}k  {floor / cost:5.2f} of the floor's pace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
