"""sharedpool: a pre-decrypted shared-buffer pool for confidential VMs, and the strategies
it is compared with, over the guest model in pool.guest."""

from pool.registry import DESCRIPTIONS, STRATEGIES, make_strategy
from pool.strategy import (
    AllocationError,
    Buffer,
    DoubleFree,
    FreeResult,
    NotOwner,
    PfnRange,
    Strategy,
    StrategyError,
    StrategyStats,
    UnknownBuffer,
    gpadl_messages,
)

__version__ = "0.1.0"

__all__ = [
    "DESCRIPTIONS",
    "STRATEGIES",
    "AllocationError",
    "Buffer",
    "DoubleFree",
    "FreeResult",
    "NotOwner",
    "PfnRange",
    "Strategy",
    "StrategyError",
    "StrategyStats",
    "UnknownBuffer",
    "__version__",
    "gpadl_messages",
    "make_strategy",
]
