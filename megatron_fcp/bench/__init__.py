"""Benchmark code: the replay of every rank's kernel calls of a plan (``replay.py``), which
``scripts/gpu_perf.py`` times on a GPU and ``scripts/bench_attention_cpu.py``-style runs use. Not on the training
path and not test support."""
