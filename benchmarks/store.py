"""The store on SQLite and on PostgreSQL at 10^6 images: batch write rate, filtered-id lookup and what a
shared store's refresh costs.

    python benchmarks/store.py [--rows 1000000] [--url postgresql://user@host:port/dbname]

Entries are generated, seeded, the same for both stores: 512-d unit embeddings (random: the store keeps
them as bytes, so their values do not matter), 70% IRMA images (a true code for 70% of them, drawn from
`CODES`, and a predicted one, sometimes stopped early) and 30% chest images (class labels), with up to two
findings each, as the test archives are. Both stores take them in the same `Store.add` transactions of
--batch rows (the load), then --small batches of 32 rows on the full store (the indexer's default model
batch). PostgreSQL is Debian's server started by tests/postgres.py in a temporary folder with its default
durability (fsync, synchronous commit), reached over TCP on loopback, or the database at --url; SQLite is a
file in --work, as cbmir opens it (WAL, synchronous=NORMAL).

Lookups: `Store.query(Filters(...))` for filters from broad to narrow, after the planner's statistics are
refreshed (VACUUM ANALYZE in PostgreSQL, as autovacuum leaves a table; ANALYZE in SQLite), one warm-up
and 7 timed runs each, median. Refresh: what another process's engine pays to learn that nothing changed
(the removal count and an empty catch-up query: `Vectors.refresh`), and a count of every image (what it
avoids). One run; the ratios are PostgreSQL over SQLite from that run. Other programs' load is measured
during each part (`OtherLoad`) and reported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/postgres.py starts the server
from cbmir.index import Filters, ImageEntry
from cbmir.index.store import Store
from common import RESULTS, OtherLoad, load_average, publish, saved_figure
from tests.postgres import PostgresServer, binaries

DIMENSION = 512
SMALL_BATCH = 32
RUNS = 7
CODES = (
    "1121-127-700-500", "1121-120-913-700", "1121-115-917-700", "1123-110-411-600", "1121-127-920-700",
    "1121-120-942-700", "1123-127-500-000", "1121-120-200-700", "1121-230-310-700", "1123-211-500-000",
    "1121-110-414-700", "1121-120-462-700", "1121-120-311-700", "1121-127-700-400", "112d-121-a10-33b",
)  # fmt: skip
PARTIAL = ("1121-12*-9**-***", "1121-127-7**-5**")
FINDINGS = ("Effusion", "Mass", "Nodule", "Pneumothorax", "Atelectasis")
LOOKUPS = {
    "all": Filters(),
    "dataset = chest (30%)": Filters(dataset="chest"),
    "anatomy 9 (leg)": Filters(anatomy="9"),
    "biology 7, predicted": Filters(biology="7", on="predicted"),
    "technical 1121 + directional 12": Filters(technical="1121", directional="12"),
    "label Mass": Filters(label="mass"),
    "anatomy 91 + dataset irma + label Nodule": Filters(anatomy="91", dataset="irma", label="Nodule"),
    "one full code, true": Filters(code="1121-120-942-700", on="true"),
}


def entries(start: int, count: int) -> list[ImageEntry]:
    """Entries `start` .. `start + count - 1`, the same for every run (seeded by `start`)."""
    rng = np.random.default_rng(start)
    vectors = rng.standard_normal((count, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chest = rng.random(count) < 0.3
    known = rng.random(count) < 0.7
    made = []
    for offset in range(count):
        number = start + offset
        true_code: str | None
        if chest[offset]:
            true_code, predicted = ("pneumonia", "normal")[number % 2], ("pneumonia", "normal")[number % 3 % 2]
        else:
            true_code = CODES[rng.integers(len(CODES))] if known[offset] else None
            predicted = (CODES + PARTIAL)[rng.integers(len(CODES) + len(PARTIAL))]
        findings = tuple(FINDINGS[i] for i in sorted(set(rng.integers(0, len(FINDINGS), rng.integers(0, 3)))))
        made.append(
            ImageEntry(
                location=f"/archive/{number // 1000}/{number}.dcm",
                content_hash=hashlib.sha256(str(number).encode()).hexdigest(),
                width=2000,
                height=2500,
                dataset="chest" if chest[offset] else "irma",
                true_code=true_code,
                predicted=predicted,
                confidences={"anatomical": 0.9},
                confidence=0.8,
                labels=findings,
                embedding=vectors[offset],
            )
        )
    return made


def batches(first: int, rows: int, size: int) -> Iterator[tuple[list[ImageEntry], np.ndarray]]:
    for start in range(first, first + rows, size):
        made = entries(start, min(size, first + rows - start))
        yield made, np.stack([entry.embedding for entry in made])


def write(store: Store, first: int, rows: int, size: int) -> dict[str, Any]:
    """Add `rows` entries in transactions of `size`; the seconds inside `Store.add` only (not generating)."""
    seconds, done, started = 0.0, 0, time.perf_counter()
    with OtherLoad() as other:
        for made, vectors in batches(first, rows, size):
            begun = time.perf_counter()
            store.add(made, vectors)
            seconds += time.perf_counter() - begun
            done += len(made)
            if done % 100_000 < size:
                print(f"  {done:,} rows, {done / seconds:,.0f} rows/s in Store.add", flush=True)
    return {
        "rows": done,
        "batch": size,
        "seconds": seconds,
        "rows_per_second": done / seconds,
        "wall_seconds": time.perf_counter() - started,
        "other_load_cores": other.cores,
    }


def timed(run, runs: int = RUNS) -> float:
    """Median milliseconds of `run()` after one warm-up."""
    run()
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations) * 1e3


def measure(location: str | Path, rows: int, batch: int, small: int) -> dict[str, Any]:
    store = Store(location)
    try:
        load = write(store, 0, rows, batch)
        small_batches = write(store, rows, small * SMALL_BATCH, SMALL_BATCH)
        database = store.database  # the planner's statistics, as autovacuum / PRAGMA optimize keep them
        if database.kind == "postgresql":
            database.execute("VACUUM (ANALYZE) images, image_labels")
            size = database.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        else:
            database.execute("ANALYZE")
            size = sum(path.stat().st_size for path in Path(location).parent.glob(Path(location).name + "*"))
        lookups = {}
        with OtherLoad() as other:
            for name, filters in LOOKUPS.items():
                ids = store.query(filters)
                lookups[name] = {"ms": timed(lambda filters=filters: store.query(filters)), "ids": len(ids)}
            last = store.max_id()
            refresh_ms = timed(lambda: (store.removals(), list(store.iter_embeddings(after_id=last))))
            count_ms = timed(store.count, runs=3)
        return {
            "load": load,
            "small_batches": small_batches,
            "lookups": lookups,
            "refresh_nothing_new_ms": refresh_ms,
            "count_ms": count_ms,
            "count": store.count(),
            "bytes": int(size),
            "lookup_other_load_cores": other.cores,
        }
    finally:
        store.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"rows": args.rows, "dimension": DIMENSION, "load_average_before": load_average()}
    for path in args.work.glob("store.sqlite*"):
        path.unlink()
    print("SQLite", flush=True)
    results["sqlite"] = measure(args.work / "store.sqlite", args.rows, args.batch, args.small)
    print("PostgreSQL", flush=True)
    server = None
    if args.url is None:
        folder = binaries()
        if folder is None:
            raise SystemExit("PostgreSQL is not installed (no initdb): apt-get install postgresql, or give --url")
        server = PostgresServer(folder, durable=True).start()
    try:
        url = args.url or server.new_database()  # type: ignore[union-attr]  # one of them is set
        results["postgresql"] = measure(url, args.rows, args.batch, args.small)
        store = Store(url)
        results["postgresql_version"] = store.database.execute("SHOW server_version").fetchone()[0]
        store.close()
    finally:
        if server is not None:
            server.stop()
    sqlite, postgres = results["sqlite"], results["postgresql"]
    results["ratios"] = {
        "write_rows_per_second": postgres["load"]["rows_per_second"] / sqlite["load"]["rows_per_second"],
        "small_batch_rows_per_second": (
            postgres["small_batches"]["rows_per_second"] / sqlite["small_batches"]["rows_per_second"]
        ),
        "lookup_ms": {name: postgres["lookups"][name]["ms"] / sqlite["lookups"][name]["ms"] for name in LOOKUPS},
    }
    results["sqlite_version"] = sqlite3.sqlite_version
    results["cpu_count"] = os.cpu_count()
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    backends = (("sqlite", "SQLite"), ("postgresql", "PostgreSQL"))
    with saved_figure(path, ncols=2, figsize=(13, 4.8)) as (_, (writes, lookups)):
        labels = [f"batches of {results['sqlite']['load']['batch']:,}", f"batches of {SMALL_BATCH}"]
        x = np.arange(len(labels))
        for shift, (key, name) in zip((-0.2, 0.2), backends, strict=True):
            rates = [results[key]["load"]["rows_per_second"], results[key]["small_batches"]["rows_per_second"]]
            writes.bar(x + shift, rates, width=0.4, label=name)
        writes.set_xticks(x, labels)
        writes.set_ylabel("rows written per second (Store.add)")
        writes.set_title(f"writes into a store of up to {results['rows']:,} rows")
        writes.legend()
        names = list(LOOKUPS)
        y = np.arange(len(names))
        for shift, (key, name) in zip((-0.2, 0.2), backends, strict=True):
            lookups.barh(y + shift, [results[key]["lookups"][n]["ms"] for n in names], height=0.4, label=name)
        lookups.set_yticks(y, names, fontsize=8)
        lookups.invert_yaxis()
        lookups.set_xscale("log")
        lookups.set_xlabel("median ms per Store.query (log scale)")
        lookups.set_title("filtered-id lookup")
        lookups.legend()


def markdown(results: dict[str, Any]) -> str:
    sqlite, postgres, ratios = results["sqlite"], results["postgresql"], results["ratios"]
    lines = [
        f"{results['rows']:,} generated images (512-d embeddings) written into each store, then lookups on the "
        f"full store. SQLite {results['sqlite_version']} (WAL, synchronous=NORMAL); PostgreSQL "
        f"{results['postgresql_version']} on loopback TCP with its default durability (fsync, synchronous "
        "commit). One run; ratios are PostgreSQL / SQLite.",
        "",
        "| | SQLite | PostgreSQL | ratio |",
        "|---|---|---|---|",
        f"| write, batches of {sqlite['load']['batch']:,} (rows/s) | {sqlite['load']['rows_per_second']:,.0f} | "
        f"{postgres['load']['rows_per_second']:,.0f} | {ratios['write_rows_per_second']:.2f} |",
        f"| write, batches of {SMALL_BATCH} on the full store (rows/s) | "
        f"{sqlite['small_batches']['rows_per_second']:,.0f} | {postgres['small_batches']['rows_per_second']:,.0f} | "
        f"{ratios['small_batch_rows_per_second']:.2f} |",
    ]
    for name in LOOKUPS:
        lines.append(
            f"| lookup: {name} ({sqlite['lookups'][name]['ids']:,} ids), ms | {sqlite['lookups'][name]['ms']:.1f} | "
            f"{postgres['lookups'][name]['ms']:.1f} | {ratios['lookup_ms'][name]:.2f} |"
        )
    lines += [
        f"| refresh finding nothing new (removal count + empty catch-up), ms | {sqlite['refresh_nothing_new_ms']:.2f} "
        f"| {postgres['refresh_nothing_new_ms']:.2f} | |",
        f"| count of every image (what the refresh avoids), ms | {sqlite['count_ms']:.0f} | "
        f"{postgres['count_ms']:.0f} | |",
        f"| size on disk | {sqlite['bytes'] / 2**30:.2f} GiB | {postgres['bytes'] / 2**30:.2f} GiB | |",
        "",
        f"Load on the machine: one-minute load average {results['load_average_before']:.2f} before the run; other "
        f"programs kept {sqlite['load']['other_load_cores']:.2f} / {postgres['load']['other_load_cores']:.2f} cores "
        f"busy during the SQLite / PostgreSQL loads and {sqlite['lookup_other_load_cores']:.2f} / "
        f"{postgres['lookup_other_load_cores']:.2f} during their lookups (the PostgreSQL server's own work counts "
        "as other programs' here). Write rates count only the time inside `Store.add` (checking every field, "
        "the duplicate check, the inserts, the commit), not generating the entries.",
        "",
        "![store write rates and lookups](benchmarks/results/store.png)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="images written into each store")
    parser.add_argument("--batch", type=int, default=1000, help="rows per Store.add transaction of the load")
    parser.add_argument("--small", type=int, default=200, help="batches of 32 rows written on the full store")
    parser.add_argument("--url", help="a new, empty PostgreSQL database to use instead of a temporary server")
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/store"), help="folder of the SQLite file")
    parser.add_argument("--keep", action="store_true", help="keep the SQLite file")
    args = parser.parse_args()
    results = run(args)
    RESULTS.mkdir(exist_ok=True)
    plot(results, RESULTS / "store.png")
    text = markdown(results)
    publish("store", results, text)
    print(text)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
