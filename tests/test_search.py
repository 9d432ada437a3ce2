"""stage=index, stage=search, stage=serve and the ONNX export on one small digits run (one run
directory for the module: shard, 2 training steps, export with export.onnx=true, a flat index)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_pipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.config import load_config
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import eval_transform
from pipeline.errors import UserError
from pipeline.models.encoders import exported_config, load_exported
from pipeline.search import faiss_index, gallery
from pipeline.search.faiss_index import VectorIndex
from pipeline.search.searcher import Searcher
from pipeline.run_context import RunContext
from pipeline.stages import index as index_stage
from pipeline.stages import search as search_stage

ARGS = ["model.depth=2", "model.embed_dim=32", "train.global_batch=32", "train.chunk_size=8", "train.max_steps=2",
        "train.checkpoint_every=2", "train.warmup_steps=1", "train.val_every=0", "eval.batch_size=128",
        "data.shard_max_count=200", "export.onnx=true"]
K = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("search_run")
    run_pipeline("stage=index", f"run_dir={run_dir}", *ARGS, "index.kind=flat")
    return run_dir


@pytest.fixture(scope="module")
def queries(run) -> Path:
    """Query images from the training split (classes the test gallery does not have), as files of
    another size than the model's (the eval view resizes and crops them)."""
    folder = run.parent / "queries"
    folder.mkdir(exist_ok=True)
    train = ShardIndex.load(run / "shards" / "train")
    for i in range(0, 60, 10):
        train.image(i).resize((48, 40), Image.BILINEAR).save(folder / f"q{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def search_output(run, queries) -> str:
    """stage=search's stdout."""
    return run_pipeline("stage=search", f"run_dir={run}", *ARGS, "index.kind=flat", f"search.images={queries}",
                        f"search.k={K}").stdout


@pytest.fixture(scope="module")
def searched(run, search_output) -> dict:
    return json.loads((run / "search" / "results.json").read_text())


def test_the_results_table_goes_to_stdout_with_class_names(run, searched, search_output):
    """Piped, stdout is the table alone; each hit names its class as the eval pictures do (the digits have
    no names: 'class 3'); the log file keeps the table too."""
    lines = search_output.splitlines()
    assert lines[0].split() == ["query", "rank", "score", "class", "key", "path"] and len(lines) == 1 + 6 * K
    hits = [r for q in searched["queries"] for r in q["results"]]
    assert [h["class"] for h in hits] == [f"class {h['label']}" for h in hits]
    assert all(f"class {h['label']}" in line for h, line in zip(hits, lines[1:]))
    assert lines[1] in (run / "logs" / "rank0.log").read_text()


def test_search_results_name_a_folders_classes(tmp_path):
    from pipeline.data.converters import Record
    from pipeline.data.shards import write_split
    from pipeline.search.searcher import class_names
    from pipeline.stages.search import table

    records = [Record(f"k{i}", i % 2, Image.new("RGB", (8, 8), (i, 0, 0)), {"class": ["cat", "dog"][i % 2]})
               for i in range(4)]
    write_split(records, tmp_path / "gallery", "test", 8, "png", max_count=10, max_size=1 << 20)
    assert class_names(tmp_path / "gallery") == {0: "cat", 1: "dog"} and class_names(tmp_path / "elsewhere") == {}
    hit = {"score": 0.5, "class": "dog", "key": "k1", "path": "dog/1.png", "label": 1}
    assert "dog" in table([Path("q.png")], [[hit]]).splitlines()[1]


def test_the_export_is_world_readable_and_its_log_names_where_it_is_kept(run):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "model.onnx"):
        assert (run / "export" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    log = (run / "logs" / "rank0.log").read_text()
    assert f"ONNX: {run / 'export' / 'model.onnx'} (onnxruntime vs torch" in log and "export.tmp" not in log


def torch_embeddings(run: Path, images: list[Image.Image]) -> np.ndarray:
    """The exported model's embeddings, computed here from the export alone."""
    model = load_exported(run / "export")
    transform = eval_transform(exported_config(run / "export"))
    with torch.no_grad():
        return model(torch.stack([transform(im.convert("RGB")) for im in images])).numpy()


def test_flat_top1_is_exact_search(run, queries, searched):
    vectors = np.load(run / "index" / "vectors.npy")
    test = ShardIndex.load(run / "shards" / "test")
    some = [0, 123, len(test) - 1]  # the gallery's stored embeddings are the export's
    np.testing.assert_allclose(vectors[some], torch_embeddings(run, [test.image(i) for i in some]), atol=1e-5)
    files = sorted(queries.iterdir())
    exact = (torch_embeddings(run, [Image.open(f) for f in files]) @ vectors.T).argmax(axis=1)
    assert [q["image"] for q in searched["queries"]] == [str(f) for f in files]
    assert [q["results"][0]["key"] for q in searched["queries"]] == [test.keys[i] for i in exact]
    for q in searched["queries"]:
        assert len(q["results"]) == K and all(r["label"] in range(10) for r in q["results"])
        assert [r["score"] for r in q["results"]] == sorted((r["score"] for r in q["results"]), reverse=True)
    assert (run / "search" / "results.png").stat().st_size > 0
    report = json.loads((run / "index" / "report.json").read_text())
    assert report["kind"] == "flat" and report["recall@1"] == report["recall@10"] == 1.0
    assert report["latency_ms"]["p50"] > 0 and report["build_s"] >= 0 and report["memory"]["index_gb"] > 0


@pytest.mark.parametrize("kind, budget_gb, refine", [("hnsw", 8, "ram"), ("ivfpq", 8, "ram"),
                                                    ("hnsw", 4e-4, "disk"), ("ivfpq", 2e-4, "disk")])
def test_approximate_index_recall_is_what_the_report_says(run, tmp_path, kind, budget_gb, refine):
    """The stage's build step on the run's gallery; recall@10 recomputed with numpy, independently.
    A budget too small for the float vectors in RAM re-ranks from the memory-mapped file."""
    cfg = load_config([f"run_dir={run}", f"index.kind={kind}", "index.queries=100", f"index.max_memory_gb={budget_gb}"])
    vectors = np.load(run / "index" / "vectors.npy")
    with np.load(run / "index" / "items.npz") as f:
        items = {k: f[k] for k in f.files}
    index_stage.build(cfg, vectors, items, {"gallery": "shards/test"}, tmp_path / "index")
    report = json.loads((tmp_path / "index" / "report.json").read_text())
    assert report["kind"] == kind and report["factory"].startswith({"hnsw": "HNSW", "ivfpq": "IVF"}[kind])
    assert report["refine"] == refine
    rows = np.array(report["query_rows"])
    found = VectorIndex.load(tmp_path / "index")
    _, ids = found.search(vectors[rows], 11)
    sims = vectors[rows] @ vectors.T
    sims[np.arange(len(rows)), rows] = -np.inf  # leave-one-out
    truth = np.argsort(-sims, axis=1)[:, :10]
    mine = [[i for i in row if i != q][:10] for row, q in zip(ids, rows)]
    recall = np.mean([len(set(m) & set(t)) / 10 for m, t in zip(mine, truth)])
    assert report["recall@10"] == pytest.approx(recall, abs=1e-12)
    assert recall >= 0.8  # tuned to index.target_recall = 0.95 on other held-out queries


def test_auto_choice_follows_the_budget():
    assert faiss_index.choose("auto", 10_000, 512, 8.0) == "flat"
    assert faiss_index.choose("auto", 1_000_000, 512, 8.0) == "hnsw"  # fits, but one exact query is too slow
    assert faiss_index.choose("auto", 1_000_000, 512, 0.5) == "ivfpq"
    with pytest.raises(UserError, match="index.max_memory_gb"):
        faiss_index.choose("flat", 1_000_000, 512, 1.0)
    with pytest.raises(UserError, match="index.kind=bogus"):
        load_config(["index.kind=bogus"])


def test_index_from_another_model_is_refused(run, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(run / "index", moved / "index")
    shutil.copytree(run / "export", moved / "export")
    assert len(Searcher(moved).search(Image.new("RGB", (20, 20)), k=2)[0]) == 2  # a moved run directory works
    weights = load_file(str(moved / "export" / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(moved / "export" / "model.safetensors"))
    with pytest.raises(UserError, match="fingerprint") as caught:
        Searcher(moved)
    assert "\n" not in str(caught.value) and "stage=index force=true" in str(caught.value)


class Crash(RuntimeError):
    pass


class Counting(torch.nn.Module):
    """The model, counting the images it embeds; raises after `crash_after` batches."""

    def __init__(self, model, crash_after=None):
        super().__init__()
        self.model, self.images, self.batches, self.crash_after = model, 0, 0, crash_after

    def forward(self, x):
        if self.crash_after is not None and self.batches == self.crash_after:
            raise Crash("killed")
        self.batches += 1
        self.images += len(x)
        return self.model(x)


def test_killed_index_resumes_without_reembedding_finished_shards(run, tmp_path):
    folder = run / "shards" / "test"
    counts = ShardIndex.load(folder).shard_counts()
    model, model_cfg = load_exported(run / "export"), exported_config(run / "export")
    tag = {"fingerprint": "x", "gallery": str(folder)}
    parts = gallery.parts_folder(tmp_path / "index", tag)
    with pytest.raises(Crash):  # killed in the third shard: two are saved
        gallery.embed_gallery(Counting(model, crash_after=9), model_cfg, folder, None, 50, torch.device("cpu"), parts)
    assert sorted(p.name for p in parts.glob("0*.npz")) == ["000000.npz", "000001.npz"]
    assert gallery.parts_folder(tmp_path / "index", tag) == parts and (parts / "000001.npz").is_file()  # kept
    again = Counting(model)
    vectors = gallery.embed_gallery(again, model_cfg, folder, None, 50, torch.device("cpu"), parts)
    assert again.images == counts.sum() - counts[:2].sum()  # only the unfinished shards
    np.testing.assert_allclose(vectors, np.load(run / "index" / "vectors.npy"), atol=1e-6)
    gallery.parts_folder(tmp_path / "index", {**tag, "fingerprint": "y"})  # another model: the parts go
    assert not (parts / "000000.npz").exists()


# --- the HTTP service -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "run.py"), "stage=serve", f"run_dir={run}", *ARGS,
                             "index.kind=flat", f"serve.port={port}", "serve.max_megapixels=25"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"stage=serve did not start:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def post(url: str, body: bytes, content_type: str | None = "image/png", k: int = K) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/search?k={k}", data=body, method="POST")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png(image: Image.Image) -> bytes:
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_http_answers_equal_stage_search(server, searched):
    with urllib.request.urlopen(server + "/health") as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["kind"] == "flat" and health["items"] > 0
    for query in searched["queries"]:
        status, answer = post(server, Path(query["image"]).read_bytes())
        assert status == 200 and answer["k"] == K
        assert [r["key"] for r in answer["results"]] == [r["key"] for r in query["results"]]
        np.testing.assert_allclose([r["score"] for r in answer["results"]], [r["score"] for r in query["results"]],
                                   atol=1e-5)


def test_http_bad_requests_get_a_4xx_and_the_service_keeps_serving(server, searched):
    good = Path(searched["queries"][0]["image"]).read_bytes()
    bomb = png(Image.new("L", (8000, 5000)))  # 40 megapixels in a few tens of kB
    bad = {"not an image": (b"hello, world", "image/png", 400), "empty body": (b"", "image/png", 400),
           "40 megapixels": (bomb, "image/png", 413), "wrong content type": (good, "text/plain", 415),
           "no content type": (good, None, 415), "truncated image": (good[:60], "image/png", 400)}
    for name, (body, content_type, status) in bad.items():
        got, answer = post(server, body, content_type)
        assert got == status, name
        assert set(answer) == {"error"} and "\n" not in answer["error"], name
        got, answer = post(server, good)
        assert got == 200 and answer["results"][0]["key"] == searched["queries"][0]["results"][0]["key"], name
    got, answer = post(server, good, k=0)
    assert got == 400 and "k=0" in answer["error"]


# --- ONNX --------------------------------------------------------------------------------------


def onnx_embeddings(export: Path, files: list[Path]) -> np.ndarray:
    """docs/exported-model.md's ONNX recipe as it stands there (onnxruntime, numpy and PIL only, the
    preprocessing from config.json), on `export` and `files` instead of its example paths."""
    doc = (REPO / "docs" / "exported-model.md").read_text()
    recipe = doc[doc.index("## ONNX"):].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"runs/demo/export/' in recipe and '["a.jpg", "b.jpg"]' in recipe
    recipe = recipe.replace('"runs/demo/export/', f'"{export}/').replace('["a.jpg", "b.jpg"]', repr([str(f) for f in files]))
    scope: dict = {}
    exec(compile(recipe, "docs/exported-model.md", "exec"), scope)
    return scope["embeddings"]


def test_onnx_export_of_the_run_matches_torch_without_project_code(run, queries):
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    assert set(config["preprocessing"]) >= {"resize", "crop", "mean", "std"}
    files = sorted(queries.iterdir())
    got = onnx_embeddings(run / "export", files)
    expected = torch_embeddings(run, [Image.open(f) for f in files])
    assert np.abs(got / np.linalg.norm(got, axis=1, keepdims=True) - expected).max() <= 1e-4


def test_reranked_search_equals_the_dense_formulas_and_dba_lives_in_the_index(run, queries, tmp_path):
    """The Searcher re-ranks as pipeline/eval/rerank.py's formulas say (dense ports in test_rerank.py);
    search.rerank=dba needs an index built with index.dba=true, which holds the augmented vectors."""
    from test_rerank import dense_aqe, dense_dba, dense_order, euclid, re_ranking

    from pipeline.eval.rerank import Rerank

    vectors = np.load(run / "index" / "vectors.npy")
    files = sorted(queries.iterdir())
    q = torch_embeddings(run, [Image.open(f) for f in files])
    def keys(found):
        return [[r["key"] for r in hits] for hits in found]
    test = ShardIndex.load(run / "shards" / "test")
    found = Searcher(run, rerank=Rerank("aqe", n=3)).search(files, k=K)
    assert keys(found) == [[test.keys[i] for i in dense_aqe(e, vectors, K, 3, 3.0)] for e in q]
    # the stage's keys reach the Searcher (stage=search in process, on a copy: the module's server holds the lock)
    staged = tmp_path / "staged"
    shutil.copytree(run, staged, ignore=shutil.ignore_patterns(".lock"))
    cfg = load_config([*ARGS, f"run_dir={staged}", "index.kind=flat", "stage=search", f"search.images={queries}",
                       f"search.k={K}", "search.rerank=aqe", "rerank.n=3"])
    search_stage.run(cfg, RunContext.resolve(cfg))
    saved = json.loads((staged / "search" / "results.json").read_text())
    assert saved["rerank"] == "aqe" and [[r["key"] for r in q["results"]] for q in saved["queries"]] == keys(found)
    found = Searcher(run, rerank=Rerank("kreciprocal", shortlist=len(vectors))).search(files[:2], k=K)
    finals = [re_ranking(euclid(e[None], vectors), np.zeros((1, 1)), euclid(vectors, vectors))[0] for e in q[:2]]
    assert keys(found) == [[test.keys[i] for i in np.argsort(f, kind="stable")[:K]] for f in finals]
    with pytest.raises(UserError, match="index.dba=true force=true") as caught:
        Searcher(run, rerank="dba")
    assert "\n" not in str(caught.value)

    moved = tmp_path / "run"
    shutil.copytree(run / "export", moved / "export")
    cfg = load_config([f"run_dir={moved}", "index.kind=flat", "index.dba=true", "rerank.n=3", "index.queries=50"])
    meta = json.loads((run / "index" / "meta.json").read_text())
    with np.load(run / "index" / "items.npz") as f:
        items = {k: f[k] for k in f.files}
    index_stage.build(cfg, vectors, items, {k: v for k, v in meta.items() if k not in ("kind", "items", "dba")},
                      moved / "index")
    augmented = dense_dba(vectors, 3, 3.0)
    np.testing.assert_allclose(np.load(moved / "index" / "vectors.npy"), augmented, atol=1e-5)
    assert json.loads((moved / "index" / "meta.json").read_text())["dba"] == {"n": 3, "alpha": 3.0}
    found = Searcher(moved, rerank="dba").search(files, k=K)
    assert keys(found) == [[test.keys[i] for i in dense_order(augmented @ e.astype(np.float64))[:K]] for e in q]


def test_search_rerank_reaches_the_searcher_from_the_command_line(run, queries):
    proc = run_pipeline("stage=search", f"run_dir={run}", *ARGS, "index.kind=flat", f"search.images={queries}",
                        "search.rerank=dba", "lock=false", check=False)  # lock: the module's server may hold it
    assert proc.returncode == 2 and "stage=index index.dba=true force=true" in proc.stderr.strip().splitlines()[-1]
