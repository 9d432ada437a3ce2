"""Experiment tracking: every contract scalar in TensorBoard's event files and in metrics.jsonl, the
same values read back from W&B (offline) and MLflow (local store) runs, the progress bar on a TTY only."""
import json
import os
import re
import shutil
import struct
import time
import zlib

import pytest
from conftest import SMALL, run_pipeline

from pipeline.config import load_config
from pipeline.models.accounting import flops_per_image
from pipeline.progress import StepProgress
from pipeline.run_dir import RunDir
from pipeline.tracking import MetricsFile, mlflow_name, open_tracker, read_metrics

TRAIN = ["train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/step_s", "time/data", "time/pass1",
         "time/loss", "time/pass2", "time/optimizer", "mem/peak_gb", "perf/mfu"]
VAL = ["val/recall@1", "val/recall@2", "val/recall@4", "val/recall@8", "val/map@r"]
# Logged every 2 steps and validated every 3 of 6; train.peak_tflops makes perf/mfu appear on the CPU.
TRACKED = [*SMALL, "train.log_every=2", "train.val_every=3", "train.peak_tflops=1"]


def by_name(records: list[dict]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in records:
        assert r["step"] not in out.setdefault(r["name"], {}), f"{r['name']} logged twice at step {r['step']}"
        out[r["name"]][r["step"]] = r["value"]
    return out


@pytest.fixture(scope="module")
def tracked(digits_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("tracked") / "run"
    shards_of(digits_run, run)
    proc = run_pipeline("stage=finetune", f"run_dir={run}", *TRACKED)
    return run, proc.stderr


def test_tensorboard_and_metrics_jsonl_hold_every_scalar(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, _ = tracked
    logged = by_name(read_metrics(run / "logs" / "metrics.jsonl"))
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    assert set(TRAIN + VAL) <= set(events.Tags()["scalars"])
    for name in TRAIN + VAL:
        steps = [2, 4, 6] if name in TRAIN else [3, 6]
        got = {e.step: e.value for e in events.Scalars(name)}
        assert sorted(got) == steps == sorted(logged[name]), name  # one value per logged step
        assert got == {s: pytest.approx(v, rel=1e-6) for s, v in logged[name].items()}, name  # float32 in TB
    # The resolved config, as hyper-parameters (TensorBoard's HParams plugin).
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.max_steps"].number_value == 6 and hparams["model.name"].string_value == "tiny"


def test_the_scalars_agree_with_each_other(tracked):
    """Throughput from the step time, the phases within it, MFU from the counted FLOPs."""
    run, _ = tracked
    logged = by_name(read_metrics(run / "logs" / "metrics.jsonl"))
    cfg = load_config([*TRACKED])
    per_image = flops_per_image(cfg.model, cfg.train.chunk_size)
    for step in (2, 4, 6):
        step_s = logged["train/step_s"][step]
        assert logged["train/images_per_s"][step] == pytest.approx(32 / step_s)
        assert sum(logged[f"time/{p}"][step] for p in ("data", "pass1", "loss", "pass2", "optimizer")) <= step_s
        assert logged["perf/mfu"][step] == pytest.approx(per_image * logged["train/images_per_s"][step] / 1e12)
        assert logged["train/lr/1"][step] == logged["train/lr"][step]  # backbone decay / no-decay groups
        assert logged["train/grad_norm"][step] > 0 and logged["mem/peak_gb"][step] > 0.1
    assert logged["train/lr/2"][2] == pytest.approx(10 * logged["train/lr"][2])  # the head's lr (1e-3 vs 1e-4)
    assert 0 < logged["val/recall@1"][6] <= logged["val/recall@8"][6] <= 1


def terminal() -> tuple[int, int]:
    """A pseudo-terminal (master, slave) of 100 x 24 characters."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    return master, slave


def read_all(fd: int) -> str:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed and everything was read
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    return out.decode()


def test_progress_bar_only_on_a_terminal(tracked):
    master, slave = terminal()
    with os.fdopen(slave, "w") as stream:
        bar = StepProgress(2, 5, rank=0, stream=stream)
        assert bar.shown
        bar.note(0.5, 123.0)
        for _ in range(3):
            bar.update()
        bar.close()
    shown = read_all(master)
    assert "train" in shown and "5/5" in shown and "loss=0.5000" in shown and "img_s=123" in shown
    read, write = os.pipe()
    with os.fdopen(write, "w") as pipe:
        bar = StepProgress(0, 5, rank=0, stream=pipe)
        assert not bar.shown
        bar.update()
        bar.close()
    assert read_all(read) == ""
    master, slave = terminal()
    with os.fdopen(slave, "w") as stream:
        assert not StepProgress(0, 5, rank=1, stream=stream).shown  # rank 0 only
    assert read_all(master) == ""
    # The run's stderr was a pipe: plain log lines, no bar.
    _, stderr = tracked
    assert "step 6/6" in stderr and not re.search(r"train:\s+\d+%\|", stderr)


def wandb_history(run_file) -> dict[str, dict[int, float]]:
    """The scalars of a W&B run file. wandb 0.31 reads .wandb files back only in its Go core, so the
    records are unframed here (the LevelDB log format the file uses: a 7-byte header, then 32 KiB
    blocks of records, each with a CRC-32, a length and a type) and parsed with wandb's own protobuf
    message, Record."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        body = data[position + 7:position + 7 + length]
        if kind == 0 or len(body) < length:  # the end, or a record still being written
            break
        assert zlib.crc32(bytes([kind]) + body) == crc, "corrupt record"
        position += 7 + length
        pending += body
        if kind in (1, 4):  # FULL or LAST
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    history, config = {}, {}
    done = any(record.WhichOneof("record_type") == "exit" for record in records)
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step")
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, {})[step] = value
        if record.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return {"history": history, "config": config, "done": done}


def read_back(tracker: str, run) -> dict[str, dict[int, float]]:
    """The scalars of the run's W&B or MLflow run, read with that library, named as in metrics.jsonl."""
    if tracker == "wandb":
        (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
        # wandb-core writes the file in its own process after finish() returns (CI once read it with no
        # record yet): read it once its exit record is there
        deadline = time.monotonic() + 60
        while not (read := wandb_history(run_file))["done"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert read["done"], f"{run_file} has no exit record after 60 s"
        assert read["config"]["train.max_steps"] == 4  # the resolved config, as the run's config
        return read["history"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("retrieval").experiment_id])
    assert mlrun.data.params["train.max_steps"] == "4" and mlrun.info.status == "FINISHED"
    names = {mlflow_name(n): n for n in TRAIN + VAL + ["train/lr/1", "train/lr/2", "train/lr/3", "time/validation"]}
    return {names[key]: {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
            for key in mlrun.data.metrics}


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_wandb_and_mlflow_hold_the_scalars_they_are_given(tracked, tmp_path, monkeypatch, tracker):
    """The tracked run's scalars, replayed through open_tracker in this process (the pipeline gives
    every sink the same dict, see the TensorBoard test), read back through each library: W&B
    offline, with no API key; MLflow's local store. The slow test below runs them in the pipeline."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    run, _ = tracked
    logged = by_name(read_metrics(run / "logs" / "metrics.jsonl"))
    cfg = load_config([*TRACKED, f"run_dir={tmp_path}", f"track={tracker}", "train.max_steps=4"])
    sink = open_tracker(cfg, RunDir(tmp_path), start=0)
    for step in sorted({s for values in logged.values() for s in values}):
        sink.log(step, {name: values[step] for name, values in logged.items() if step in values})
    sink.close()
    assert read_back(tracker, tmp_path) == logged
    assert by_name(read_metrics(tmp_path / "logs" / "metrics.jsonl")) == logged


@pytest.mark.slow
@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_wandb_and_mlflow_in_a_pipeline_run(tracked, tmp_path, monkeypatch, tracker):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    run, _ = tracked
    shards_of(run, tmp_path)
    run_pipeline("stage=finetune", f"run_dir={tmp_path}", *SMALL, f"track={tracker}", "train.max_steps=4",
                 "train.log_every=2", "train.val_every=2")
    logged = by_name(read_metrics(tmp_path / "logs" / "metrics.jsonl"))
    assert set(TRAIN[:-1] + VAL) <= set(logged)  # no perf/mfu on the CPU without train.peak_tflops
    assert read_back(tracker, tmp_path) == logged


def test_metrics_file_drops_what_a_crashed_run_logged_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsFile(path, start=0)
    for step in (2, 4, 6):
        first.log(step, {"train/loss": step / 10})
    first.close()
    resumed = MetricsFile(path, start=4)  # resumed from the checkpoint of step 4
    resumed.log(6, {"train/loss": 0.7})
    resumed.close()
    assert by_name(read_metrics(path)) == {"train/loss": {2: 0.2, 4: 0.4, 6: 0.7}}
    MetricsFile(path, start=0).close()  # a run from scratch starts a fresh file
    assert read_metrics(path) == []


def shards_of(run, other):
    """A run directory with `run`'s shards only (finetune starts from scratch there)."""
    shutil.copytree(run / "shards", other / "shards")
    (other / "stages").mkdir()
    shutil.copy(run / "stages" / "shard.json", other / "stages" / "shard.json")
