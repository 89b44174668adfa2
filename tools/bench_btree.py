#!/usr/bin/env python3
"""Benchmark the cowtree B-tree beside sqlite3 and LMDB in one run.

Each engine gets the same N random 16-byte keys with 32-byte values:

1. insert every key in one transaction, then commit (durably: cowtree and
   LMDB fdatasync, sqlite3 runs with its default ``synchronous=FULL``);
2. look up every key once, in a different random order;
3. scan every item in key order.

cowtree is used below the filesystem layer: a Volume from
``Volume.create`` and one tree from ``volume.create_tree``.  A 16-byte key
k becomes the item key ``(int.from_bytes(k[:8]), 1, int.from_bytes(k[8:]))``.
Lookups and the scan run on the same open volume after the commit, so the
node cache is warm up to its byte limit.  sqlite3 uses a ``WITHOUT ROWID``
table with a BLOB primary key and ``executemany`` for the inserts.

Usage: python3 tools/bench_btree.py [--n 1000000] [--seed 1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cowtree import tune_gc  # noqa: E402
from cowtree.transaction import Volume  # noqa: E402

try:
    import lmdb
except ImportError:  # pragma: no cover - reported in the output
    lmdb = None

BENCH_TREE_ID = 256


def make_items(n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """Return n distinct random 16-byte keys and n random 32-byte values."""
    rng = random.Random(seed)
    keys = list({rng.randbytes(16) for _ in range(n)})
    while len(keys) < n:
        keys.append(rng.randbytes(16))
        keys = list(set(keys))
    rng.shuffle(keys)
    blob = rng.randbytes(32 * n)
    values = [blob[i * 32:(i + 1) * 32] for i in range(n)]
    return keys, values


def cowtree_key(key: bytes) -> tuple[int, int, int]:
    return (int.from_bytes(key[:8], "big"), 1, int.from_bytes(key[8:], "big"))


def bench_cowtree(workdir: str, keys, values, lookup_order) -> dict:
    path = os.path.join(workdir, "bench.cowtree")
    open(path, "wb").close()
    volume = Volume.create(path)
    try:
        tree = volume.create_tree(BENCH_TREE_ID)
        tuple_keys = [cowtree_key(k) for k in keys]
        put = tree.put
        start = time.perf_counter()
        for key, value in zip(tuple_keys, values):
            put(key, value)
        volume.commit()
        insert_s = time.perf_counter() - start

        lookup_keys = [tuple_keys[i] for i in lookup_order]
        get = tree.get
        start = time.perf_counter()
        for key in lookup_keys:
            if get(key) is None:
                raise RuntimeError(f"cowtree: inserted key {key} not found")
        lookup_s = time.perf_counter() - start

        start = time.perf_counter()
        count = 0
        for _ in tree.items():
            count += 1
        scan_s = time.perf_counter() - start
        size = os.path.getsize(path)
    finally:
        volume.close()
    return _result(len(keys), insert_s, lookup_s, scan_s, count, size)


def bench_sqlite(workdir: str, keys, values, lookup_order) -> dict:
    path = os.path.join(workdir, "bench.sqlite")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        start = time.perf_counter()
        db.execute("BEGIN")
        db.executemany("INSERT INTO kv VALUES (?, ?)", zip(keys, values))
        db.execute("COMMIT")
        insert_s = time.perf_counter() - start

        query = "SELECT v FROM kv WHERE k = ?"
        execute = db.execute
        start = time.perf_counter()
        for i in lookup_order:
            if execute(query, (keys[i],)).fetchone() is None:
                raise RuntimeError(f"sqlite3: inserted key {keys[i].hex()} not found")
        lookup_s = time.perf_counter() - start

        start = time.perf_counter()
        count = 0
        for _ in db.execute("SELECT k, v FROM kv ORDER BY k"):
            count += 1
        scan_s = time.perf_counter() - start
    finally:
        db.close()
    return _result(len(keys), insert_s, lookup_s, scan_s, count, os.path.getsize(path))


def bench_lmdb(workdir: str, keys, values, lookup_order) -> dict:
    path = os.path.join(workdir, "bench.lmdb")
    env = lmdb.open(path, map_size=4 << 30, subdir=True)
    try:
        start = time.perf_counter()
        with env.begin(write=True) as txn:
            put = txn.put
            for key, value in zip(keys, values):
                put(key, value)
        env.sync(True)
        insert_s = time.perf_counter() - start

        start = time.perf_counter()
        with env.begin() as txn:
            get = txn.get
            for i in lookup_order:
                if get(keys[i]) is None:
                    raise RuntimeError(f"lmdb: inserted key {keys[i].hex()} not found")
        lookup_s = time.perf_counter() - start

        start = time.perf_counter()
        count = 0
        with env.begin() as txn:
            for _ in txn.cursor():
                count += 1
        scan_s = time.perf_counter() - start
    finally:
        env.close()
    size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    return _result(len(keys), insert_s, lookup_s, scan_s, count, size)


def _result(n, insert_s, lookup_s, scan_s, count, size) -> dict:
    if count != n:
        raise RuntimeError(f"scan returned {count} items, expected {n}")
    return {
        "insert_us": insert_s / n * 1e6,
        "lookup_us": lookup_s / n * 1e6,
        "scan_items_s": n / scan_s,
        "file_mb": size / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of keys (default 1000000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for keys, values and lookup order")
    parser.add_argument("--dir", default=None, help="directory for the database files (default: a new temporary one)")
    parser.add_argument("--engines", default="cowtree,sqlite3,lmdb",
                        help="comma-separated engines to run (default cowtree,sqlite3,lmdb)")
    parser.add_argument("--default-gc", action="store_true",
                        help="keep Python's default garbage collector thresholds instead of the ones the "
                             "cowtree CLI and FUSE daemon set (cowtree.tune_gc)")
    args = parser.parse_args()
    if not args.default_gc:
        tune_gc()

    print(f"n: {args.n}")
    print(f"gc thresholds: {gc.get_threshold()}")
    print(f"seed: {args.seed}")
    keys, values = make_items(args.n, args.seed)
    lookup_order = list(range(args.n))
    random.Random(args.seed + 1).shuffle(lookup_order)

    runners = {"cowtree": bench_cowtree, "sqlite3": bench_sqlite, "lmdb": bench_lmdb}
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_btree.") as workdir:
        for name in args.engines.split(","):
            if name == "lmdb" and lmdb is None:
                print("lmdb: skipped, the lmdb package is not installed (pip install lmdb)")
                continue
            results[name] = runners[name](workdir, keys, values, lookup_order)

    print(f"{'engine':<8} {'insert µs':>10} {'lookup µs':>10} {'scan items/s':>13} {'file MB':>8}"
          f"  {'insert x':>9} {'lookup x':>9} {'scan x':>7}")
    base = results.get("sqlite3")
    for name, r in results.items():
        line = (f"{name:<8} {r['insert_us']:>10.2f} {r['lookup_us']:>10.2f} {r['scan_items_s']:>13,.0f}"
                f" {r['file_mb']:>8.1f}")
        if base:
            # Ratios are time per operation against sqlite3: below 1 is faster.
            line += (f"  {r['insert_us'] / base['insert_us']:>9.2f} {r['lookup_us'] / base['lookup_us']:>9.2f}"
                     f" {base['scan_items_s'] / r['scan_items_s']:>7.2f}")
        print(line)
    if "cowtree" in results:
        r = results["cowtree"]
        print(f"target insert <= 10 µs: {'met' if r['insert_us'] <= 10 else 'missed'} ({r['insert_us']:.2f})")
        print(f"target lookup <= 5 µs: {'met' if r['lookup_us'] <= 5 else 'missed'} ({r['lookup_us']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
