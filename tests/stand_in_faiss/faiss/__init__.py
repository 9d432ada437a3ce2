"""A stand-in faiss for the tests: the real one (faiss-cpu) as a GPU build without code for the GPU behaves.
It reports one GPU; an index moved there aborts the process at its first search, as faiss's CUDA_TEST_ERROR
does after a kernel launch that has no code for the device (PyPI's faiss-gpu-cu12 on an H100).
Put its parent folder first on PYTHONPATH."""
import importlib.machinery
import importlib.util
import os
import sys

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.machinery.PathFinder.find_spec("faiss", [p for p in sys.path if os.path.abspath(p or ".") != _here])
_real = importlib.util.module_from_spec(_spec)
sys.modules["faiss"] = _real  # `import faiss` returns this module: the real one, patched below
_spec.loader.exec_module(_real)


class StandardGpuResources:
    pass


class IndexOnTheGpu:
    def __init__(self, index):
        self.cpu = index

    def add(self, x):
        self.cpu.add(x)

    def search(self, x, k):
        sys.stderr.write("Faiss assertion 'err__ == cudaSuccess' failed in void faiss::gpu::runL2Norm: "
                         "CUDA error 209 no kernel image is available for execution on the device\n")
        sys.stderr.flush()
        os.abort()


_real.get_num_gpus = lambda: 1
_real.StandardGpuResources = StandardGpuResources
_real.index_cpu_to_gpu = lambda resources, device, index: IndexOnTheGpu(index)
