"""Batches per second of the DALI loaders' reader thread, with the training thread idle or busy.

    python -m tools.bench_reader --shards DIR [--folder DIR/train] --batch-size 256 --seconds 5

The reader thread (`pipeline.batch_stream.BatchStream`) shares the GIL with the training loop.
This measures it alone, without decoding: a consumer thread takes each batch as DALI would, while
the main thread either sleeps or runs pure Python (holding the GIL as a busy training loop does).
Shards are read as slices of the mapped tars; an image folder (--folder) with a system call per
file, which a busy main thread slows far more. Prints both rates and their ratio per source.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from pipeline.batch_stream import BatchStream
from pipeline.folder import list_image_folder
from pipeline.sample_table import SampleTable, file_table, shard_table
from pipeline.shard_set import open_shard_set
from tools.bench_common import add_json_flag, at_least_one, finish_report, measuring_seconds, shard_dir

MAIN_THREAD_MODES = ("idle", "busy")


def reader_rate(table: SampleTable, batch_size: int, seconds: float, main_thread: str) -> float:
    """Batches per second the reader thread hands over while the main thread is `idle` or `busy`."""
    order = np.random.default_rng(0).permutation(len(table))
    rows = order[: len(order) // batch_size * batch_size]
    if len(rows) == 0:
        raise ValueError(f"fewer samples ({len(table)}) than one batch ({batch_size})")
    stream = BatchStream(table, lambda epoch: rows, 0, batch_size, read_ahead=4, make_inputs=lambda batch: ())
    stop, taken = threading.Event(), [0]

    def consume() -> None:  # what DALI's source callback and the loader do with each batch
        while not stop.is_set():
            stream()
            stream.done()
            taken[0] += 1

    try:
        for _ in range(4):  # warm up: open the files, fill the read-ahead queue
            stream()
            stream.done()
        consumer = threading.Thread(target=consume, daemon=True)
        started = time.perf_counter()
        consumer.start()
        if main_thread == "busy":
            spins = 0
            while time.perf_counter() - started < seconds:
                spins += 1
        else:
            time.sleep(seconds)
        stop.set()
        consumer.join()
        return taken[0] / (time.perf_counter() - started)
    finally:
        stream.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_reader", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=shard_dir, required=True, help="a shard directory (its train split is read)")
    p.add_argument("--folder", help="also an image folder, DIR/<class>/*.JPEG")
    p.add_argument("--batch-size", type=at_least_one, default=256)
    p.add_argument("--seconds", type=measuring_seconds, default=5)
    add_json_flag(p)
    args = p.parse_args(argv)
    sources = [("shards (mapped)", shard_table(open_shard_set(args.shards, "train")))]
    if args.folder:
        sources.append(("folder (preadv)", file_table(*list_image_folder(args.folder))))
    results = []
    for name, table in sources:
        rates = {mode: reader_rate(table, args.batch_size, args.seconds, mode) for mode in MAIN_THREAD_MODES}
        results.append({"source": name, **{f"batches_per_s_main_{mode}": rate for mode, rate in rates.items()}})
        print(f"{name:16s} idle {rates['idle']:8.1f}  busy {rates['busy']:8.1f} batches/s", flush=True)
    print(f"\nreader thread, batch {args.batch_size}: batches/s with the main thread idle / busy in Python")
    print("source              idle      busy   busy/idle  samples/s busy")
    for r in results:
        idle, busy = r["batches_per_s_main_idle"], r["batches_per_s_main_busy"]
        print(f"{r['source']:16s} {idle:8.1f} {busy:9.1f} {busy / idle:10.3f} {busy * args.batch_size:15.0f}")
    finish_report("reader", args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
