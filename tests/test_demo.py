"""The README's demo command runs start to finish."""

from tests.conftest import run_tool


def test_demo_converts_and_verifies(tmp_path):
    result = run_tool("tools.demo", "--out", str(tmp_path / "demo"), check=True)
    assert "verify_shards:" in result.stdout and "OK" in result.stdout
    assert (tmp_path / "demo" / "shards" / "manifest.json").is_file()
    again = run_tool("tools.demo", "--out", str(tmp_path / "demo"), check=True)
    assert "already complete" in again.stdout
