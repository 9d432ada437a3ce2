"""From a finetuned encoder to search: a gallery embedded into a faiss index (stage=index), queried
from Python (`Searcher(run_dir).search(images, k)`), the command line (stage=search) or HTTP
(stage=serve), and the encoder exported to ONNX (export.onnx=true). See docs/search.md."""


def __getattr__(name):  # `from pipeline.search import Searcher` without importing torch for the others
    if name == "Searcher":
        from pipeline.search.searcher import Searcher
        return Searcher
    raise AttributeError(name)
