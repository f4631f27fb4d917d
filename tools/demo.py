"""The built-in demo: make a small ImageNet-style folder, convert it to shards, verify them.

    python -m tools.demo [--out runs/demo]

Each step runs the same command a user would type, printed before it runs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def run_step(*args: str) -> None:
    command = [sys.executable, "-m", *args]
    print("$ python -m " + shlex.join(args), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where data, shards and logs go")
    args = p.parse_args(argv)
    data, shards = args.out / "imagenet", args.out / "shards"
    try:
        if not (data / "val_labels.txt").exists():
            run_step("tools.make_demo_data", "--out", str(data))
        run_step(
            "tools.make_shards", "--train", str(data / "train"), "--val", str(data / "val"),
            "--val-labels", str(data / "val_labels.txt"), "--out", str(shards), "--shard-size-mb", "1",
        )  # fmt: skip
        run_step("tools.verify_shards", str(shards), "--decode")
    except subprocess.CalledProcessError as err:
        print(f"demo: step failed with exit status {err.returncode}", file=sys.stderr)
        return 1
    print(f"demo: done; shards and manifest.json are in {shards}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
