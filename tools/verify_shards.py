"""Check a shard directory against its manifest.json.

    python -m tools.verify_shards /data/imagenet-shards [--decode] [--workers N]

Prints one line per problem (naming the shard and sample) and exits 1 if there is any, else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from shards.verify import verify_directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.verify_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="output directory of tools.make_shards")
    p.add_argument("--decode", action="store_true", help="also decode every image")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        problems = verify_directory(args.directory, decode=args.decode, workers=max(1, args.workers))
    except KeyboardInterrupt:
        print(f"verify_shards: interrupted; {args.directory} is not verified", file=sys.stderr)
        return 130
    for line in problems:
        print(line)
    took = time.monotonic() - started
    if problems:
        print(f"verify_shards: {len(problems)} problem(s) in {args.directory} ({took:.1f} s)", file=sys.stderr)
        return 1
    print(f"verify_shards: {args.directory} OK{' (all images decoded)' if args.decode else ''} ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
