"""`mesh init`: the quickstart written into a directory, never over what is there."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from mesh.cli import main
from mesh.topology import load

ROOT = Path(__file__).resolve().parents[2]


def test_init_writes_the_repository_quickstart_and_sample_data(tmp_path: Path) -> None:
    """The topology written is the one `make run` starts (one file, not a copy), and it loads."""
    result = CliRunner().invoke(main, ["init", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    demo = tmp_path / "demo"
    assert (demo / "mesh.toml").read_text() == (ROOT / "topologies" / "quickstart.toml").read_text()
    assert set(load(str(demo / "mesh.toml")).nodes) == {"echo", "kv", "sqlite", "fs"}
    assert (demo / "var" / "sample.db").stat().st_size > 0 and (demo / "var" / "files").is_dir()
    assert "mesh up" in (demo / "README.md").read_text()


def test_init_refuses_a_directory_that_has_a_topology_and_changes_nothing(tmp_path: Path) -> None:
    """Invariant: nothing that exists is overwritten; the error names the file."""
    (tmp_path / "mesh.toml").write_text("# mine\n")
    result = CliRunner().invoke(main, ["init", str(tmp_path)])
    assert result.exit_code != 0 and "mesh.toml exists" in result.output
    assert (tmp_path / "mesh.toml").read_text() == "# mine\n"
    assert not (tmp_path / "var").exists() and not (tmp_path / "README.md").exists()
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    result = CliRunner().invoke(main, ["init", str(blocked)])
    assert result.exit_code != 0


def test_init_where_nothing_can_be_written_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    """Invariant: an OS refusal (a directory that cannot be made) is a usage error naming the
    path and the reason, with no traceback (it used to escape as FileNotFoundError)."""
    result = CliRunner().invoke(main, ["init", "/proc/no-such-quickstart"])
    assert result.exit_code == 2, result.output
    assert "cannot create /proc/no-such-quickstart" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
