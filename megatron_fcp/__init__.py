"""megatron-fcp: flexible context parallelism (FCP) for Megatron-LM.

FCP shards the sequences of a packed micro-batch into blocks, places blocks from short and long documents onto
context-parallel ranks so that attention cost and token counts balance, and exchanges keys and values between
ranks peer-to-peer as a precomputed plan says, instead of passing them around a ring. The package holds a pure
planner, a cost simulator over real document-length distributions, and (optionally) a Megatron-LM adapter.
"""

__version__ = "0.1.0"
