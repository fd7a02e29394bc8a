"""A good FCP argument namespace as Megatron's parser leaves it (TP 2 x CP 4: 16 processes as 2 data-parallel
replicas), for the tests of the adapter's start-up checks; ``args(**changes)`` is it with some values changed."""

from __future__ import annotations

import argparse

GOOD = dict(context_parallel_mode="fcp", context_parallel_size=4, tensor_model_parallel_size=2,
            pipeline_model_parallel_size=1, seq_length=4096, micro_batch_size=1, calculate_per_token_loss=True,
            num_attention_heads=8, group_query_attention=True, num_query_groups=4, position_embedding_type="rope",
            attention_dropout=0.0, attention_backend="auto", mock_data=False, reset_position_ids=True,
            sequence_parallel=True, fcp_edge_cost_tile_size="auto", fcp_planning_workers=2, fcp_exchange_timeout=None)


def args(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{**GOOD, **changes})
