"""The library's layers (issue 21): the import graph runs one way, and the entry point shadows nothing."""
import importlib.util
import re
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


def sources_under(*folders: str) -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for folder in folders for p in (REPO / "pipeline" / folder).rglob("*.py")}


def test_world_device_and_splits_are_resolved_once():
    """Issue 34: the runner resolves the world and the device (pipeline/run_context.py); stages and the
    training code receive them; the shards' summary.json is read through RunDir alone."""
    for path, text in sources_under("stages", "train").items():
        assert "world_from_env(" not in text and "pick_device(" not in text, path
    for path, text in sources_under(".").items():
        if path != "pipeline/run_dir.py":
            assert not re.search(r"summary\.json\"\)\.read_text|summary\.json\"\)\.open", text), path


def test_backend_names_are_compared_only_in_the_table():
    """Issue 34: what a backend does is pipeline/config/backends.py's table; no other module branches on its name."""
    pattern = re.compile(r"""(==|!=|\bin|startswith\()\s*\(?["'](ddp|zero\w*|fsdp2)["']|parallel[\w.]*\s*[!=]=\s*["']none""")
    for path, text in sources_under(".").items():
        if path not in ("pipeline/config/backends.py", "pipeline/parallel/engine.py"):
            assert not pattern.search(text), (path, pattern.search(text))


def test_code_map_lists_every_module():
    """docs/layout.md's module listing is the code's (regenerate it with `python tools/code_map.py --write`)."""
    spec = importlib.util.spec_from_file_location("code_map", REPO / "tools" / "code_map.py")
    code_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code_map)  # not through sys.path: tools/ holds sweep.py, a name pipeline/ has too
    assert code_map.documented() == code_map.listing(), "run: python tools/code_map.py --write"
