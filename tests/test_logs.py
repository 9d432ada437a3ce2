"""Logs a person can read: progress bars on a terminal only; in a file, a line at most every N seconds
(pipeline/progress.py), and no carriage return anywhere in the demo's output or its logs/."""
import io
import logging

from pipeline import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_file_logs_count_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    stream = io.StringIO()
    assert list(progress.progress(range(5), "shard train", total=5, unit="image", every=0.0, stream=stream)) == list(range(5))
    assert stream.getvalue() == ""  # no bar drawn
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and lines[1].startswith("shard train: 2/5 image, ") and " image/s, ETA 0 s" in lines[1]
    caplog.clear()
    list(progress.progress(range(1000), "embed test", total=1000, stream=stream))  # well under EVERY seconds
    assert caplog.records == []


def test_progress_on_a_terminal_is_a_bar_on_rank_0_only():
    terminal = Terminal()
    assert list(progress.progress(range(3), "embed", total=3, stream=terminal)) == [0, 1, 2]
    assert "embed" in terminal.getvalue() and "\r" in terminal.getvalue()
    quiet = Terminal()
    list(progress.progress(range(3), "embed", total=3, rank=1, stream=quiet))
    assert quiet.getvalue() == ""


def test_progress_line_eta():
    assert progress.progress_line("validate on val", 300, 900, 2.0, "batch") == \
        "validate on val: 300/900 batch, 2 batch/s, ETA 5 min 00 s"


def test_demo_output_in_a_file_has_no_carriage_return(quickstart):
    """The Quick start's output written to a file (conftest.quickstart), and its run's logs."""
    status, text, run_dir = quickstart
    assert status == 0, text[-3000:]
    assert "[eval] done" in text and "validation at step 50" in text
    assert "\r" not in text
    for path in [*sorted((run_dir / "logs").rglob("*.log")), *sorted((run_dir / "logs").rglob("*.jsonl"))]:
        assert b"\r" not in path.read_bytes(), path
