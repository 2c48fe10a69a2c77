"""README.md's result tables are what ``benchmarks/readme_tables.py`` makes from the committed
files in benchmarks/results/, and every result file README.md names exists. Nothing is
measured."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables  # noqa: E402

README = (ROOT / "README.md").read_text()


def _history_is_complete() -> bool:
    """Whether git can say what changed after a result's commit: a git checkout that is not
    shallow."""
    try:
        res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and res.stdout.strip() == "false"


def _without_gpu_change_notes(text: str) -> str:
    return re.sub(rf" {readme_tables.GPU_CHANGED} [^`]*`[^`]*`\.", "", text)


def test_every_table_is_in_the_readme():
    names = [m.group(2) for m in readme_tables.BLOCK.finditer(README)]
    assert sorted(names) == sorted(readme_tables.TABLES), names


@pytest.mark.parametrize("name", sorted(readme_tables.TABLES))
def test_table_matches_the_result_files(name):
    block = next(m for m in readme_tables.BLOCK.finditer(README) if m.group(2) == name)
    expected, shown = readme_tables.render(name), block.group(3)
    if not _history_is_complete():  # whether the GPU code changed since cannot be told here
        expected, shown = _without_gpu_change_notes(expected), _without_gpu_change_notes(shown)
    assert shown == expected, (f"README.md's {name} table differs from benchmarks/results; run "
                               "python benchmarks/readme_tables.py")


def test_every_result_file_named_exists():
    """Names as README.md writes them: ``model_cpu_resnet50.*`` for a file's CSV, JSON and PNG,
    ``soak_<device>.json`` for one per device."""
    named = {re.sub(r"<[^>]*>", "*", n).rstrip(".")
             for n in re.findall(r"benchmarks/results/[\w.*<>-]+", README)}
    assert named
    missing = [n for n in sorted(named) if not list(ROOT.glob(n))]
    assert not missing, missing
