"""Entry point: `python pipeline/run.py stage=<shard|embed|finetune|eval|export|all> run_dir=DIR key=value ...`

Also run as a script by torchrun, `accelerate launch` and srun. Python puts this file's folder first
on sys.path, where modules named like top-level ones (`config`, `distributed`, ...) would shadow
them, so it is taken off before anything is imported.
"""
import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.append(os.path.dirname(here))  # the repository, for a checkout that is not pip-installed
    from pipeline.runner import main

    sys.exit(main())
