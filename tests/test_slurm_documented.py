"""Every example command in the slurm/ scripts' headers, in slurm/README.md, in README.md and in the
docs/ pages, so that a documented command cannot rot: the small ones (model=tiny on the
demo data) run as written on the local cluster, with only the job's output and run_dir sent to a
temporary folder; the others (real data and weights, absent here) at least pass the config check,
with the defaults the script puts before them."""
import itertools
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from slurm_cluster import completed, require_cluster, user_env

from pipeline.sweep import grid as sweep
from pipeline.config import load_config

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
DOCS = sorted((REPO / "docs").glob("*.md"))
PIPELINE_STAGES = ("embed.sh", "finetune_{}.sh", "eval.sh")  # what slurm/pipeline.sh submits
PIPELINE_MODEL = {"vitl": "model=vitl14_clip", "vitg": "model=vitg14_clip"}


def code_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks of a Markdown text."""
    return [line for i, block in enumerate(text.split("```")) if i % 2 for line in block.splitlines()]


def header(script: Path) -> list[str]:
    """A script's header: its comment lines after the #! line, up to #SBATCH or the first command."""
    lines = script.read_text().split("#SBATCH")[0].splitlines()[1:]
    return [line.lstrip("#") for line in itertools.takewhile(lambda line: line.startswith("#"), lines)]


def documented() -> list[str]:
    """Every command line that submits a slurm/ script, as documented (continuation lines joined, a
    trailing comment cut); a synopsis with [optional] parts is not an example."""
    pages = [REPO / "README.md", *DOCS, REPO / "slurm" / "README.md"]
    candidates = [line for page in pages for line in code_lines(page.read_text())]
    for script in SCRIPTS:
        candidates += header(script)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(candidates)).splitlines()
    commands = {re.split(r"\s+#", line.strip())[0] for line in joined}
    return sorted(c for c in commands if re.match(r"(\w+=\S*\s+)*(sbatch|bash)\s.*slurm/\w+\.sh", c)
                  and " [" not in c)


def parse(command: str) -> tuple[dict, str, list[str]]:
    """(environment assignments, script name, key=value arguments); '...' and 'key=...' (elisions) dropped."""
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[:next(i for i, w in enumerate(words) if "=" not in w)])
    script = next(Path(w).name for w in words if w.startswith("slurm/") and w.endswith(".sh"))
    after = words[next(i for i, w in enumerate(words) if w.endswith(script)) + 1:]
    return env, script, [w for w in after if "=" in w and not w.startswith("-") and not w.endswith("=...")]


def script_defaults(name: str) -> list[str]:
    """The key=value arguments a job script puts before the user's: its `launch ...` line."""
    line = next(l for l in (REPO / "slurm" / name).read_text().splitlines() if l.startswith("launch "))
    return [w for w in shlex.split(line)[1:] if "=" in w]


def job_lines(command: str) -> list[list[str]]:
    """The pipeline/run.py arguments of every job the command submits."""
    env, script, args = parse(command)
    if script != "pipeline.sh":
        return [script_defaults(script) + args]
    finetune = env.get("FINETUNE", "vitl")
    return [script_defaults(s.format(finetune)) + [PIPELINE_MODEL[finetune]] + args for s in PIPELINE_STAGES]


COMMANDS = documented()
SMALL = [c for c in COMMANDS if "model=tiny" in c]


def test_the_documentation_has_examples_of_both_kinds():
    assert len(COMMANDS) >= 8 and SMALL, COMMANDS
    assert all("--cpus-per-task=" in c for c in SMALL), "a small job keeps the script's --cpus-per-task=64 and pends"


def sweep_words(command: str) -> tuple[list[str], list[str]]:
    """slurm/sweep.sh's (grid words, fixed words): its own and sbatch's options left out."""
    words = shlex.split(command)
    words = words[next(i for i, w in enumerate(words) if w.endswith("slurm/sweep.sh")) + 1:]
    rest, fixed = (words[:words.index("--")], words[words.index("--") + 1:]) if "--" in words else (words, [])
    grid, skip = [], False
    for word in rest:
        if not skip and not word.startswith("-"):
            grid.append(word)
        skip = word in ("--out", "--throttle")  # options whose value is the next word
    return grid, fixed


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_arguments_pass_the_config_check(command):
    if parse(command)[1] == "sweep.sh":  # every run of the grid, as tools/sweep.py checks them
        sweep.plan(*sweep_words(command))
        return
    for args in job_lines(command):
        load_config(args)  # a UserError (unknown key, preset or value) fails the test with its line


@pytest.mark.parametrize("command", SMALL)
def test_documented_small_job_runs_as_written(command, tmp_path):
    require_cluster(nodes=2)
    words = shlex.split(command)
    at = next(i for i, w in enumerate(words) if w in ("sbatch", "slurm/pipeline.sh")) + 1
    words = [*words[:at], f"--output={tmp_path}/job-%j.out", *words[at:], f"run_dir={tmp_path / 'run'}"]
    env = {k: v for k, v in user_env().items() if k != "NPROC_PER_NODE"}  # the scripts' default: one per node
    proc = subprocess.run(shlex.join(words), shell=True, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = re.findall(r"^(?:Submitted batch job|\w+) (\d+)$", proc.stdout, re.MULTILINE)
    assert ids, proc.stdout
    for job_id in ids:
        completed(job_id, tmp_path / f"job-{job_id}.out")
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
