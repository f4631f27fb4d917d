"""`checkpoint.keep_best`: the checkpoints of a run's N best-scoring epochs, kept for averaging.

timm keeps its best N checkpoints (`--checkpoint-hist`) and averages them (`avg_checkpoints`);
keeping every epoch (`checkpoint.keep_every_epochs: 1`) would do for that too, but a 600-epoch
ResNet-50 run would hold 600 checkpoints. The list of kept epochs travels in each checkpoint
(`best_kept`: [score, epoch] pairs, best first), so a resumed run knows which files are its own: a
file written by a run past the checkpoint it resumed from is named, not counted (timm's list starts
empty on resume and never prunes the files it finds).
"""

from __future__ import annotations

from pathlib import Path

from train.checkpoint import keep_copy


def best_epoch_name(epoch: int) -> str:
    """The file name of epoch `epoch`'s kept checkpoint (`epoch` counts completed epochs, as epoch-N.pt)."""
    return f"best-epoch-{epoch}.pt"


def rank_epochs(kept: list[list], epoch: int, score: float, limit: int) -> tuple[list[list], list[int]]:
    """The `limit` best of `kept` and this epoch's [score, epoch], best first, and the epochs that
    fall out. Among equal scores the earlier epoch ranks first, as best.pt is chosen (and timm's list)."""
    ranked = sorted([*kept, [score, epoch]], key=lambda pair: (-pair[0], pair[1]))
    return ranked[:limit], [e for _, e in ranked[limit:]]


def keep_epoch(run_dir: Path, last: Path, epoch: int, kept: list[list], dropped: list[int]) -> None:
    """Rank 0, after `last` (epoch `epoch`'s checkpoint, holding `kept`) is written: link it as this
    epoch's file if it is among the kept, and remove the files of the epochs that fell out."""
    if any(e == epoch for _, e in kept):
        keep_copy(last, run_dir / best_epoch_name(epoch))
    for e in dropped:
        if e != epoch:  # a file of this epoch's number can only be a run's past the resumed checkpoint
            (run_dir / best_epoch_name(e)).unlink(missing_ok=True)


def reconcile_on_resume(run_dir: Path, kept: list[list], checkpoint_path: Path, checkpoint: dict) -> list[str]:
    """Rank 0, resuming: make the files agree with the checkpoint's list and say what differs.

    A kept epoch whose file is missing because the run stopped between writing the checkpoint and
    linking it is linked from the checkpoint itself; any other missing file is named (and dropped
    from `kept`, in place). Files the list does not hold (written past the checkpoint resumed from,
    or by a run whose list was lost) are named and left as they are."""
    notes = []
    resumed_epoch = checkpoint["epoch"] if checkpoint["step_in_epoch"] == 0 else None
    for pair in list(kept):
        path = run_dir / best_epoch_name(pair[1])
        if path.is_file():
            continue
        if pair[1] == resumed_epoch:
            keep_copy(checkpoint_path, path)
        else:
            kept.remove(pair)
            notes.append(f"{path} is missing: no longer among the best kept")
    own = {best_epoch_name(e) for _, e in kept}
    others = sorted((p.name for p in run_dir.glob("best-epoch-*.pt") if p.name not in own), key=_epoch_of)
    if others:
        notes.append(
            f"{', '.join(others)} in {run_dir} are not among the best epochs kept by the checkpoint resumed from "
            "(written after it, or by another run): left as they are, not counted, replaced if this run keeps "
            "an epoch of that number"
        )
    return notes


def _epoch_of(name: str) -> int:
    digits = name.removeprefix("best-epoch-").removesuffix(".pt")
    return int(digits) if digits.isdigit() else -1
