"""Distributed FCP attention (needs torch): the attention step, the exchange layer, the kernel backends."""

from megatron_fcp.attention.engine import fcp_attention, get_exchange
from megatron_fcp.attention.exchange import ByteCounter, ExchangeError, ExchangeTimeout, P2PExchange
from megatron_fcp.attention.executor import run_in_process
from megatron_fcp.attention.schedule import RankSchedule, build_schedule

__all__ = ["ByteCounter", "ExchangeError", "ExchangeTimeout", "P2PExchange", "RankSchedule", "build_schedule",
           "fcp_attention", "get_exchange", "run_in_process"]
