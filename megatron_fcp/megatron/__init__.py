"""Megatron-LM integration (needs megatron-core 0.19 for ``model``, ``step`` and ``pretrain_gpt``; ``config``
and ``batch`` need only numpy): ``--context-parallel-mode fcp`` flags and start-up checks, data-loader hooks,
the FCP core attention installed through the layer spec, the forward step, and the training entry point."""
