"""Sweeps: a grid of pipeline runs in one folder (grid.py), and their summary over seeds (summary.py, plots.py).

    grid words   `loss=rsk,margin seed=0,1,2`: a preset group or a dotted key, its values split on the
                 commas outside brackets (`train.ks=[1,2],[1,4]` is two values)
    runs         one per grid point (the product of the words, the first word slowest), each a run
                 directory SWEEP/<its words joined by commas>, run with the fixed `key=value` words
                 plus its own; the plan is saved in SWEEP/sweep.json so that other processes (a Slurm
                 array task, the aggregation job) read the same runs
    finished     every requested stage of the run is complete for these settings (the runner's own
                 completion markers), so a finished run is skipped and a killed one run again
    shared       runs whose shard stage has the same settings shard once (tools/sweep.py): the others
                 copy the shards and the stage's marker
    summary      for each setting (a grid point without its seed, its words joined by spaces), the
                 mean, sample standard deviation and n of every metric of the finished runs:
                 SWEEP/summary.json, SWEEP/summary.md (with the runs that did not finish), and plots

Metric names, from each run directory: `eval/metrics.json`'s metrics of the finetuned model by their
own names (`recall@1`), other models' with the model in front (`frozen/recall@1`), evaluations of
protocols with several in between (`test800/recall@1`); `eval/diagnostics.json`'s as
`<split>/<name>` (`test/rho`, `frozen/test/pi_ratio`); and from `logs/metrics.jsonl` (the training
scalars, when the run logged validation) the best value of every `val/...` scalar, as
`best val/recall@1` (the highest; the lowest for a loss).
"""
