"""sharedpool: a pre-decrypted shared-buffer pool for confidential VMs, and the strategies
it is compared with, over the guest model in pool.guest."""

from pool.provision import Guests, Provisioned, provision
from pool.registry import DESCRIPTIONS, SPECS, STRATEGIES, PoolSettings, make_strategy, spec_for
from pool.strategy import (
    AllocationError,
    Buffer,
    DoubleFree,
    FreeResult,
    NotOwner,
    PfnRange,
    Resizable,
    Strategy,
    StrategyError,
    StrategyStats,
    UnknownBuffer,
    gpadl_messages,
)

__version__ = "0.1.0"

__all__ = [
    "DESCRIPTIONS",
    "SPECS",
    "STRATEGIES",
    "AllocationError",
    "Buffer",
    "DoubleFree",
    "FreeResult",
    "Guests",
    "NotOwner",
    "PfnRange",
    "PoolSettings",
    "Provisioned",
    "Resizable",
    "Strategy",
    "StrategyError",
    "StrategyStats",
    "UnknownBuffer",
    "__version__",
    "gpadl_messages",
    "make_strategy",
    "provision",
    "spec_for",
]
