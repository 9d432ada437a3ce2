"""Entry point: `python pipeline/run.py stage=<shard|embed|finetune|eval|export|all> run_dir=DIR key=value ...`

Also `python -m pipeline.run ...`, and run as a file by torchrun, `accelerate launch` and srun. Run as
a file, Python puts this folder first on sys.path; nothing in it is named like a top-level module
the code imports (tests/test_layers.py checks), so no path needs changing. `pipeline` itself comes
from the project's environment (tools/env.sh installs it).
"""
import sys

from pipeline.runner import main

if __name__ == "__main__":
    sys.exit(main())
