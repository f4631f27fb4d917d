"""Converter throughput against its floor: a bare parallel decode of the same files.

    python -m tools.bench_convert [--src DIR] [--workers N] [--repeat 3] [--archive]

The converter decodes every image once to validate it, so a bare decode of the same files with the
same number of processes is the fastest it could be. Prints both rates and their ratio (target:
at least 0.80). Without --src it uses the 1000 real photographs of ../shared/data/imagenet-sample
(each linked --copies times), or generated demo images where that folder is absent. With
--archive the same images are also packed as ILSVRC2012_img_train.tar (a tar of class tars) and
converted from it, in place, in the same alternation.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

from shards.convert import ConvertOptions, convert
from tools.make_demo_data import build_demo_imagenet, link_sample_tree, pack_train_archive


def _decode(path: str) -> int:
    with Image.open(path) as image:
        image.load()
        return image.width


def bare_decode_rate(paths: list[str], workers: int) -> float:
    started = time.perf_counter()
    with Pool(workers) as pool:
        for _ in pool.imap(_decode, paths, chunksize=4):
            pass
    return len(paths) / (time.perf_counter() - started)


def convert_rate(train_dir: Path, out: Path, workers: int, count: int, shard_size_mb: float) -> float:
    started = time.perf_counter()
    opts = ConvertOptions(
        out=str(out), train=str(train_dir), workers=workers, shard_size_mb=shard_size_mb,
        progress_bar=False,
    )  # fmt: skip
    convert(opts)
    return count / (time.perf_counter() - started)


def _train_tree(root: Path, src: Path | None, copies: int) -> Path:
    """A train/<wnid>/ tree of links to the source photographs, each linked `copies` times."""
    if src is not None:
        return src
    linked = link_sample_tree(root, copies)
    if linked is None:
        return build_demo_imagenet(root / "generated", num_classes=100, train_per_class=10 * copies) / "train"
    return linked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, help="a train/<wnid>/*.JPEG folder (default: the shared real sample)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--copies",
        type=int,
        default=3,
        help="link each sample photograph this many times, so start-up costs (process pool, scanning) weigh "
        "about as little as on ImageNet's 1.28M files (default: 3)",
    )
    p.add_argument("--repeat", type=int, default=3, help="alternating runs of each; the best rate counts")
    p.add_argument(
        "--archive", action="store_true", help="also convert from the images packed as one tar of class tars"
    )
    p.add_argument(
        "--shard-size-mb",
        type=float,
        default=4,
        help="shards are the converter's unit of parallel work: small ones give this small sample the many "
        "shards per worker that ImageNet has at the default 128 MB (default: 4)",
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        train = _train_tree(Path(tmp), args.src, args.copies)
        paths = sorted(str(f) for f in train.rglob("*") if f.is_file())
        sources = {"make_shards": train}
        if args.archive:
            (Path(tmp) / "archive").mkdir()
            sources["make_shards from archive"] = pack_train_archive(train, Path(tmp) / "archive" / "train.tar")
        rates: dict[str, list[float]] = {"bare parallel decode": [], **{name: [] for name in sources}}
        for run in range(args.repeat):
            rates["bare parallel decode"].append(bare_decode_rate(paths, args.workers))
            for name, source in sources.items():
                out = Path(tmp) / f"out-{run}-{len(rates[name])}-{name.replace(' ', '-')}"  # fresh, as a first run
                rates[name].append(convert_rate(source, out, args.workers, len(paths), args.shard_size_mb))
        source_bytes = sum(os.path.getsize(p) for p in paths)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = {name: max(values) for name, values in rates.items()}
    decode = best["bare parallel decode"]
    print(
        f"images: {len(paths)} ({source_bytes / 1e6:.0f} MB) from {train}, workers: {args.workers}, "
        f"shards of {args.shard_size_mb} MB"
    )
    for name, rate in best.items():
        print(f"{name:26s} {rate:8.1f} images/s  {rate / decode:5.2f} of bare decode")
    print("target: make_shards >= 0.80 of bare decode")
    print(f"peak memory of the writer process: {peak_rss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
