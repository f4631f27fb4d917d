"""torch.compile's modes as the benchmarks take them and name them in tables.

A module of its own, without torch, so that `tools.gpu_report` imports nothing heavy.
"""

from __future__ import annotations

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


def compiled_text(mode: str | bool | None) -> str:
    """' compiled', ' compiled (reduce-overhead)', or '' (older result files hold True for 'default')."""
    if not mode:
        return ""
    return " compiled" if mode in (True, "default") else f" compiled ({mode})"
