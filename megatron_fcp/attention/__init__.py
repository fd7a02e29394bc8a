"""The attention step of the training path (needs torch): schedule, exchange, and ``fcp_attention``."""

from megatron_fcp.attention.engine import fcp_attention, get_exchange
from megatron_fcp.attention.exchange import ByteCounter, ExchangeError, ExchangeTimeout, P2PExchange
from megatron_fcp.attention.schedule import RankSchedule, build_schedule

__all__ = ["ByteCounter", "ExchangeError", "ExchangeTimeout", "P2PExchange", "RankSchedule", "build_schedule",
           "fcp_attention", "get_exchange"]
