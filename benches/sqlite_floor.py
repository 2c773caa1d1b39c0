#!/usr/bin/env python3
"""What SQLite itself costs the usage ledger, per row and per commit, with the ledger's own
schema (read from src/ledger/mod.rs) and rows shaped like the gateway's (time-ordered row and
request ids, one tenant and key): CPU (user + system) and wall time per row, one transaction
per batch (BEGIN IMMEDIATE; the rows; the totals upsert; COMMIT), WAL mode, for several batch
sizes, synchronous=FULL (the ledger's default) and NORMAL (`ledger.fsync: false`).

It is a floor, not the gateway: no sqlx, no gateway, Python's sqlite3 (its SQLite may be another
version than the one sqlx bundles; the script prints both numbers it can see). Python's own
cost (a few µs per row) is included.

usage: benches/sqlite_floor.py [ROWS per run, default 20000]
"""

import os
import random
import re
import sqlite3
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def schema():
    src = open(os.path.join(ROOT, "src/ledger/mod.rs"), encoding="utf-8").read()
    stmts = []
    for const in ("V1_LEDGER", "V2_TOTALS"):
        body = re.search(r"const " + const + r": &\[&str\] = &\[(.*?)\];\n", src, re.S)
        stmts += re.findall(r'"(CREATE [^"]*)"', body.group(1))
    return ";\n".join(stmts) + ";"


def rows(n):
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        ms = now + i // 10  # about 10 rows per millisecond, as under load
        out.append((
            "%012x%020x" % (ms, random.getrandbits(80)),
            "req_%012x%020x" % (ms, random.getrandbits(80)),
            ms, "bench", "bench-key", "chat", "gpt-4o-mini", "gpt-4o-mini", "echo",
            31, 12, 0, "upstream", "miss", 0, 0, None, 200, "completed", 0, 0, 1, 12345,
            "v1", None,
        ))
    return out


def run(batch, sync, total, ddl):
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "ledger.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=" + sync)
        db.executescript(ddl)
        data = rows(total)
        insert = "INSERT INTO usage_ledger VALUES (" + ",".join("?" * len(data[0])) + ")"
        totals = (
            "INSERT INTO usage_totals VALUES (?, ?, ?, ?) ON CONFLICT (scope, period) DO UPDATE SET "
            "cost_nanousd = usage_totals.cost_nanousd + excluded.cost_nanousd, "
            "requests = usage_totals.requests + excluded.requests"
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(0, total, batch):
            chunk = data[i:i + batch]
            db.execute("BEGIN IMMEDIATE")
            db.executemany(insert, chunk)
            db.executemany(totals, [
                ("t:bench", "d2026-11-27", 12345 * len(chunk), len(chunk)),
                ("t:bench", "m2026-11", 12345 * len(chunk), len(chunk)),
                ("k:bench-key", "d2026-11-27", 12345 * len(chunk), len(chunk)),
                ("k:bench-key", "m2026-11", 12345 * len(chunk), len(chunk)),
            ])
            db.execute("COMMIT")
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        db.close()
        return cpu / total * 1e6, wall / total * 1e6


def main():
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    ddl = schema()
    print(f"SQLite {sqlite3.sqlite_version} (Python's); {total} rows per run (batch 1: {total // 5})")
    print(f"{'sync':<7}{'batch':>6}{'cpu us/row':>12}{'wall us/row':>13}")
    for sync in ("FULL", "NORMAL"):
        for batch in (1, 20, 60, 200, 1000):
            n = total // 5 if batch == 1 else total
            cpu, wall = run(batch, sync, n, ddl)
            print(f"{sync:<7}{batch:>6}{cpu:>12.1f}{wall:>13.1f}")


if __name__ == "__main__":
    main()
