"""CPU demo and test support for the Megatron integration: a tiny megatron-core GPT trained on gloo processes
(``python -m megatron_fcp.cpu_demo``), and the CPU shims megatron-core needs there. Not used by training."""
