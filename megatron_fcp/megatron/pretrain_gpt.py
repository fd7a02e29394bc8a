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
import time

from megatron_fcp.errors import InputError
from megatron_fcp.megatron import dataset_helpers
from megatron_fcp.megatron.config import add_fcp_args, check_fcp_args, fcp_config_from_args
from megatron_fcp.megatron.signals import start_checkpoint_results_queue


def wants_fcp(argv: list[str]) -> bool:
    """Whether a command line asks for ``--context-parallel-mode fcp`` (used by the Megatron-LM patch)."""
    for i, arg in enumerate(argv):
        if arg == "--context-parallel-mode" and i + 1 < len(argv):
            return argv[i + 1] == "fcp"
        if arg.startswith("--context-parallel-mode="):
            return arg.split("=", 1)[1] == "fcp"
    return False


def parse_checked_args():
    """Megatron's arguments plus FCP's; FCP's start-up checks run before Megatron's validation."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    args = parse_args(extra_args_provider=add_fcp_args)
    try:
        check_fcp_args(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        dataset_helpers.check()
    except InputError as err:
        print(f"megatron-fcp: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.context_parallel_mode == "fcp":
        args.num_workers = max(args.num_workers, args.fcp_planning_workers)
    validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    set_global_variables(args)
    return args


# -- data ------------------------------------------------------------------------------------------------
def _gpt_dataset_config(args):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Train/valid/test datasets: Megatron's GPT datasets; under FCP wrapped so each CP rank gets its plan."""
    from megatron.core import mpu
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    from megatron_fcp.megatron.batch import FcpBatchDataset, MockDocumentDataset

    args = get_args()
    if args.context_parallel_mode == "fcp" and args.mock_data:
        vocab = getattr(args, "padded_vocab_size", None) or args.vocab_size
        datasets = [MockDocumentDataset(int(n), args.seq_length, args.fcp_mock_doclens, vocab, seed=args.seed + i)
                    if n else None for i, n in enumerate(train_val_test_num_samples)]
    else:
        kind = MockGPTDataset if args.mock_data else GPTDataset
        datasets = BlendedMegatronDatasetBuilder(kind, train_val_test_num_samples, lambda: True,
                                                 _gpt_dataset_config(args)).build()
    if args.context_parallel_mode == "fcp":
        cfg, cp_rank = fcp_config_from_args(args), mpu.get_context_parallel_rank()
        datasets = [FcpBatchDataset(ds, cfg, cp_rank) if ds is not None else None for ds in datasets]
        print_rank_0(f"> FCP: micro-batches of {cfg.seq_length} tokens planned by '{cfg.scheduler}' over CP "
                     f"{cfg.cp} in {args.num_workers} data-loader worker(s) per rank")
    return tuple(datasets)


datasets_provider.is_distributed = True  # every rank builds its datasets (each CP rank its own plan share)


# -- steps -------------------------------------------------------------------------------------------------
def ring_forward_step(data_iterator, model):
    """Megatron's plain GPT step: the CP rank's zigzag chunks of the micro-batch, Megatron's CP attention."""
    import torch
    from megatron.core.parallel_state import get_context_parallel_group
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_fcp.megatron.step import per_token_loss

    batch = next(data_iterator)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    batch = {k: batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    batch["attention_mask"] = None
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=get_context_parallel_group())
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, lambda out, mask=batch["loss_mask"]: per_token_loss(mask, out)


class FcpForwardStep:
    """FCP's ``forward_step_func``; every ``log_interval`` micro-batches rank 0 prints the FCP figures."""

    def __init__(self, log_interval: int):
        self.log_interval = max(1, log_interval)
        self.last = time.perf_counter()

    def __call__(self, data_iterator, model):
        from megatron.training import print_rank_0

        from megatron_fcp.megatron.step import STEP_STATS, fcp_forward_step

        out = fcp_forward_step(data_iterator, model)
        if len(STEP_STATS.samples) >= self.log_interval:
            s = STEP_STATS.take_summary()
            now, n = time.perf_counter(), s["micro_batches"]
            per_mb = (now - self.last) / n
            self.last = now
            print_rank_0(
                f" fcp | per micro-batch: {1e3 * per_mb:.1f} ms wall, planning {1e3 * s['plan_s'] / n:.2f} ms "
                f"(in data-loader workers), data-loader wait {1e3 * s['loader_wait_s'] / n:.2f} ms | attention "
                f"pairs imbalance {s['pairs_imbalance']:.3f}, key/value traffic {100 * s['comm_vs_ring']:.1f}% of "
                f"ring's | {s['num_docs']:.1f} documents per micro-batch")
        return out


def main() -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args

    from megatron_fcp.megatron.model import fcp_model_config

    args = parse_checked_args()
    if args.save:  # the save on SIGTERM (--exit-signal-handler) needs a checkpoint helper that outlives it
        start_checkpoint_results_queue()
    model_cfg = gpt_config_from_args(args)
    if args.context_parallel_mode == "fcp":
        model_cfg = fcp_model_config(model_cfg, fcp_config_from_args(args))
        forward_step = FcpForwardStep(args.log_interval)
    else:
        forward_step = ring_forward_step
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), datasets_provider, ModelType.encoder_or_decoder,
             forward_step)


if __name__ == "__main__":
    main()
