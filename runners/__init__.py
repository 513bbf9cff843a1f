"""Device-agnostic runners that capture a model's step as device graphs and replay them.

A server imports this package and ``hal`` for device names; nothing here names a device.
"""

from runners.capture_loop import RunnerStateError
from runners.capture_memory import PoolBudgetError
from runners.buckets import BucketPolicy, default_decode_buckets, default_prefill_buckets
from runners.capture_report import CaptureReport
from runners.config import DecodeConfig, PhaseConfig, PrefillConfig
from runners.debug_switches import GraphVerifyError
from runners.decode_runner import DecodeRunner
from runners.graph_budget import GraphBudgetError
from runners.graph_config import GraphConfig
from runners.input_slots import InputSlot
from runners.memory_plan import MemoryPlan, MemoryPlanError, plan_graph_memory
from runners.prefill_runner import PrefillRunner
from runners.rank_group import RankCaptureError, RankRunError
from runners.static_inputs import StaticInputs
from runners.thread_owner import RunnerThreadError

__all__ = [
    "BucketPolicy",
    "CaptureReport",
    "DecodeConfig",
    "DecodeRunner",
    "GraphBudgetError",
    "GraphConfig",
    "GraphVerifyError",
    "InputSlot",
    "MemoryPlan",
    "MemoryPlanError",
    "PhaseConfig",
    "PrefillConfig",
    "PrefillRunner",
    "RankCaptureError",
    "RankRunError",
    "PoolBudgetError",
    "RunnerStateError",
    "RunnerThreadError",
    "StaticInputs",
    "default_decode_buckets",
    "default_prefill_buckets",
    "plan_graph_memory",
]
