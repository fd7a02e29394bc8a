"""GPT pretraining on megatron.training with ``--context-parallel-mode {ring,fcp}``.

Run it like Megatron-LM's ``pretrain_gpt.py`` (every usual Megatron argument works)::

    torchrun --nproc-per-node 8 -m megatron_fcp.megatron.pretrain_gpt \\
        --context-parallel-size 8 --context-parallel-mode fcp --calculate-per-token-loss \\
        --reset-position-ids --reset-attention-mask --eod-mask-loss --micro-batch-size 1 ... (model, data, optimizer)

``ring`` is Megatron's own context parallelism, unchanged (Megatron's GPT datasets, zigzag slicing, the layer
spec's CP attention). ``fcp`` swaps in the FCP data hooks (each CP rank plans the micro-batch in its data-loader
workers and takes its planned tokens), the FCP core attention in the usual layer spec, and per-token RoPE.
Misconfigurations stop the run at start-up with one line naming the problem (see ``config.check_fcp_args``).
"""

from __future__ import annotations

import os
import sys

from megatron_fcp.errors import InputError
from megatron_fcp.megatron import dataset_helpers
from megatron_fcp.megatron.config import HEAD_SPLITTING, add_fcp_args, check_fcp_args, fcp_config_from_args
from megatron_fcp.megatron.signals import start_checkpoint_results_queue


def wants_fcp(argv: list[str]) -> bool:
    """Whether a command line asks for ``--context-parallel-mode fcp`` (used by the Megatron-LM patch)."""
    for i, arg in enumerate(argv):
        if arg == "--context-parallel-mode" and i + 1 < len(argv):
            return argv[i + 1] == "fcp"
        if arg.startswith("--context-parallel-mode="):
            return arg.split("=", 1)[1] == "fcp"
    return False


def check_startup(args, world_size: int) -> None:
    """FCP's start-up checks on Megatron's parsed arguments (:class:`InputError`, one line: FCP's flags and the
    Megatron settings it depends on, megatron-core's dataset helpers), then FCP's planning workers as data-loader
    workers. Shared with ``python -m megatron_fcp.launch rehearse``, so both fail alike."""
    check_fcp_args(args, world_size=world_size)
    dataset_helpers.check()
    if args.context_parallel_mode == "fcp":
        args.num_workers = max(args.num_workers, args.fcp_planning_workers)


def parse_checked_args():
    """Megatron's arguments plus FCP's; FCP's start-up checks run before Megatron's validation."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    args = parse_args(extra_args_provider=add_fcp_args)
    try:
        check_startup(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except InputError as err:
        print(f"megatron-fcp: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    set_global_variables(args)
    return args


# -- data ------------------------------------------------------------------------------------------------
def _gpt_dataset_config(args):
    """Megatron's GPTDatasetConfig of the run, without the dense attention mask (see
    ``megatron_fcp.megatron.datasets.gpt_dataset_config``)."""
    from megatron_fcp.megatron.datasets import gpt_dataset_config

    return gpt_dataset_config(args)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Train/valid/test datasets: Megatron's GPT datasets; under FCP wrapped so each CP rank gets its plan
    (``megatron_fcp.megatron.datasets.build_datasets``). A data path that cannot work (missing .bin/.idx,
    documents without end-of-document tokens, ...) stops the run with one line, as the start-up checks do."""
    from megatron.core import mpu
    from megatron.training import get_args, print_rank_0

    from megatron_fcp.megatron.datasets import build_datasets

    args = get_args()
    cp_ranks = mpu.get_context_parallel_global_ranks()  # the node of each CP rank goes into every plan
    try:
        datasets = build_datasets(args, train_val_test_num_samples, mpu.get_context_parallel_rank(), cp_ranks)
    except InputError as err:
        print(f"megatron-fcp: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.context_parallel_mode == "fcp":
        cfg = fcp_config_from_args(args).with_nodes(cp_ranks)
        nodes = "no node layout" if cfg.cp_node is None else f"on {max(cfg.cp_node) + 1} node(s)"
        print_rank_0(f"> FCP: micro-batches of {cfg.seq_length} tokens planned by '{cfg.scheduler}' over CP "
                     f"{cfg.cp} ({nodes}) in {args.num_workers} data-loader worker(s) per rank")
    return datasets


datasets_provider.is_distributed = True  # every rank builds its datasets (each CP rank its own plan share)


# -- steps -------------------------------------------------------------------------------------------------
def ring_forward_step(data_iterator, model):
    """Megatron's GPT step on its per-document THD path: every document of the packed micro-batch padded to a
    multiple of 2*cp, this CP rank's chunks r and 2cp-1-r of each document, Megatron's CP attention restricted to
    documents through ``packed_seq_params`` (see ``megatron_fcp.megatron.thd``; with ``--transformer-impl local``,
    CP 1 only, a dense document mask instead). Returns the per-token losses and the loss function (Megatron's
    per-token loss; padding slots have loss mask 0)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    from megatron_fcp.megatron.step import per_token_loss
    from megatron_fcp.megatron.thd import ring_step_inputs, thd_sample

    batch = next(data_iterator)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    sample = thd_sample(batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"],
                        cp=parallel_state.get_context_parallel_world_size(),
                        tp=parallel_state.get_tensor_model_parallel_world_size())
    local_attention = getattr(get_attr_wrapped_model(model, "config"), "transformer_impl", None) == "local"
    local, attention_mask, packed_seq_params = ring_step_inputs(
        sample.to(device), parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_group(),
        local_attention)
    output = model(local["tokens"], local["position_ids"], attention_mask, labels=local["labels"],
                   loss_mask=local["loss_mask"], packed_seq_params=packed_seq_params)
    return output, lambda out, mask=local["loss_mask"]: per_token_loss(mask, out)


class FcpForwardStep:
    """FCP's ``forward_step_func`` for Megatron's ``pretrain``: a :class:`~megatron_fcp.megatron.step.FcpStep` made
    at the first call, once Megatron has made its process groups (with a gloo twin of the CP group, on which each
    micro-batch's plan is checked without synchronising the GPU, and under ``--fcp-node-exchange heads`` the node and
    across groups of :mod:`megatron_fcp.attention.head_parallel`). FCP's figures travel in the loss report, so
    Megatron's log line and TensorBoard show them (``megatron_fcp.megatron.step.FIGURES``)."""

    def __init__(self, cfg):
        self.cfg, self.step = cfg, None

    def __call__(self, data_iterator, model):
        if self.step is None:
            from megatron.core import parallel_state

            from megatron_fcp.attention.head_parallel import make_head_parallel_groups
            from megatron_fcp.megatron.step import FcpStep, host_cp_group

            cp_group = parallel_state.get_context_parallel_group() if self.cfg.cp > 1 else None
            host_group = host_cp_group(cp_group) if cp_group is not None else None
            if cp_group is not None and self.cfg.node_exchange in HEAD_SPLITTING:  # every rank, here, in one order
                nodes = self.cfg.with_nodes(parallel_state.get_context_parallel_global_ranks())
                make_head_parallel_groups(cp_group, nodes.heads_per_node)
            self.step = FcpStep(self.cfg, cp_group, host_group)
        return self.step(data_iterator, model)


def main() -> None:
    """Parse and check the arguments, start the checkpoint helper, and run Megatron's ``pretrain``.

    Waits are bounded by Megatron's ``--distributed-timeout-minutes`` (default 10): Megatron passes it to
    ``init_process_group`` and to every process group it makes, and nothing of FCP's waits longer. FCP's gloo twin of
    the CP group (``megatron_fcp.megatron.step.host_cp_group``, ``dist.new_group`` without a timeout) inherits the
    default group's timeout, which is that flag's; a timed key/value exchange wait (``--fcp-exchange-timeout``) must
    be shorter, checked at start-up (``config.check_fcp_args``). The checkpoint results queue's helper ignores
    SIGTERM (for the save on SIGTERM) but dies with this process (``megatron_fcp.megatron.signals``), so a killed
    trainer leaves nothing holding the job's output."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args

    from megatron_fcp.megatron.model import fcp_model_config

    args = parse_checked_args()
    if args.save:  # the save on SIGTERM (--exit-signal-handler) needs a checkpoint helper that outlives it
        start_checkpoint_results_queue()
    model_cfg = gpt_config_from_args(args)
    if args.context_parallel_mode == "fcp":
        fcp_cfg = fcp_config_from_args(args)
        model_cfg = fcp_model_config(model_cfg, fcp_cfg)
        forward_step = FcpForwardStep(fcp_cfg)
    else:
        forward_step = ring_forward_step
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), datasets_provider, ModelType.encoder_or_decoder,
             forward_step)


if __name__ == "__main__":
    main()
