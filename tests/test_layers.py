"""The library's layers (issue 21): the import graph runs one way, and the entry point shadows nothing."""
import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml: the layers, and config imports no torch."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_no_module_of_pipeline_shadows_a_top_level_one():
    """`python pipeline/run.py` puts pipeline/ first on sys.path: no name there may be a module the
    code (or a library it imports) could mean."""
    names = {p.stem for p in (REPO / "pipeline").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    names.discard("__init__")
    clash = sorted(n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n) is not None)
    assert clash == []


def test_both_entry_points_run():
    """`python pipeline/run.py` and `python -m pipeline.run` reach the same config checks."""
    for cmd in ([sys.executable, "pipeline/run.py"], [sys.executable, "-m", "pipeline.run"]):
        proc = subprocess.run([*cmd, "train.max_step=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == "error: unknown config key 'train.max_step'; did you mean 'train.max_steps'?"
