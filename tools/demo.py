"""The built-in demo: make a small ImageNet-style folder, convert, verify, train, evaluate, predict.

    python -m tools.demo

Each step runs the same command a user would type, printed before it runs. The data is 10 classes
of crops of the real sample photographs (so val images resemble train images closely: this shows
the machinery working and the model learning, not ImageNet accuracy). Outputs go to runs/demo/.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
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
    p.add_argument("overrides", nargs="*", help="trainer config overrides, e.g. train.epochs=2")
    args = p.parse_args(argv)
    data, shards, run = args.out / "imagenet", args.out / "shards", args.out / "train"
    try:
        if not (data / "val_labels.txt").exists():
            run_step("tools.make_demo_data", "--out", str(data))
        run_step(
            "tools.make_shards", "--train", str(data / "train"), "--val", str(data / "val"),
            "--val-labels", str(data / "val_labels.txt"), "--out", str(shards), "--shard-size-mb", "1",
        )  # fmt: skip
        run_step("tools.verify_shards", str(shards), "--decode")
        if run.exists():  # the trainer refuses to start afresh over an earlier run's checkpoints
            print(f"$ rm -r {shlex.quote(str(run))}", flush=True)
            shutil.rmtree(run)
        run_step("train", "--config", "configs/demo.yaml", f"data.shards={shards}", f"run.dir={run}", *args.overrides)
        run_step(
            "train.evaluate", "--checkpoint", str(run / "best.pt"), "--shards", str(shards), "--workers", "2",
            "--per-class", str(run / "val-per-class.csv"),
        )  # fmt: skip
        run_step("tools.predict", "--checkpoint", str(run / "best.pt"), *sorted(map(str, (data / "val").iterdir()))[:2])
    except subprocess.CalledProcessError as err:
        print(f"demo: step failed with exit status {err.returncode}", file=sys.stderr)
        return 1
    print(
        f"demo: done; shards in {shards}, logs and checkpoints in {run} (tensorboard --logdir {run}), each class's "
        f"val accuracy in {run / 'val-per-class.csv'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
