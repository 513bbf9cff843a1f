"""Device-agnostic runners that capture a model's step as device graphs and replay them.

A server imports this package and ``hal`` for device names; nothing here names a device.
"""

from runners.buckets import BucketPolicy, default_decode_buckets
from runners.capture_report import CaptureReport
from runners.config import DecodeConfig
from runners.decode_runner import DecodeRunner
from runners.input_slots import InputSlot
from runners.static_inputs import StaticInputs

__all__ = [
    "BucketPolicy",
    "CaptureReport",
    "DecodeConfig",
    "DecodeRunner",
    "InputSlot",
    "StaticInputs",
    "default_decode_buckets",
]
