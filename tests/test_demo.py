"""The README's demo command runs start to finish and learns well above chance."""

import re

from tests.conftest import run_tool

DEMO_CLASSES = 10


def test_demo_converts_verifies_trains_evaluates_and_predicts(tmp_path):
    # As a user runs it: torch with its default threads (tests/conftest.py sets one for the rest).
    result = run_tool(
        "tools.demo", "--out", str(tmp_path / "demo"), check=True, timeout=900, env={"OMP_NUM_THREADS": None}
    )
    assert "verify_shards:" in result.stdout and "OK" in result.stdout
    final_acc1 = float(re.search(r"^done: acc1 ([\d.]+)", result.stdout, re.MULTILINE).group(1))
    chance = 100 / DEMO_CLASSES
    assert final_acc1 >= 4 * chance, result.stdout
    assert '"acc1": ' in result.stdout, "train.evaluate printed its result"
    assert "%  " in result.stdout, "tools.predict printed top-5 classes"
    assert (tmp_path / "demo" / "train" / "best.pt").is_file()
    per_class = (tmp_path / "demo" / "train" / "val-per-class.csv").read_text().splitlines()
    assert per_class[0].startswith("class,wnid,name,samples,") and len(per_class) == 1 + DEMO_CLASSES
