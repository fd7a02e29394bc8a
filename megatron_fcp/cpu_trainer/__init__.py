"""The CPU trainer: a tiny megatron-core GPT trained on gloo CPU processes with FCP (or ring, or no CP), through
the same hooks, layer spec and forward step as the Megatron entry point, and the CPU shims megatron-core needs.

- ``worker.py``: one process of a run (``python -m megatron_fcp.cpu_trainer.worker`` under ``torchrun``): what the
  Slurm scripts start for a run config with ``device: cpu``, and what the tests and the demo launch.
- ``train.py``: the training loop, checkpoints, records, and launching a run's processes.
- ``__main__.py``: the demo (``python -m megatron_fcp.cpu_trainer``): FCP at CP N, then the same run without CP,
  and their losses compared.

Not used by GPU training, which runs ``megatron_fcp.megatron.pretrain_gpt``.
"""
