"""The sampling parameters as input slots: one row per request, read by the captured sampler from device memory.

Every parameter is a tensor so that a captured graph reads the value of the step it replays, never the value
of the step it was captured with (a Python scalar reaching a kernel is baked into the graph). The fills make
a padded row a greedy row: no random numbers, no filter, the argmax of whatever logits the padded row has.
"""

from __future__ import annotations

import torch

from runners import InputSlot

# Slot name -> (dtype, fill); the order is the order of ``sample``'s arguments.
_SLOTS = {
    "temperature": (torch.float32, 0.0),  # 0: greedy (argmax of the raw logits); otherwise logits / temperature
    "top_k": (torch.int32, 0),  # keep the k most likely tokens; 0: off; at most the sampler's max_top_k
    "top_p": (torch.float32, 1.0),  # keep the fewest most likely tokens whose probability reaches top_p; 1.0: off
    "min_p": (torch.float32, 0.0),  # keep tokens at least min_p times as likely as the most likely; 0.0: off
    "seed": (torch.int64, 0),  # the request's seed, any int64
    "counter": (torch.int64, 0),  # tokens the request has generated so far: its random numbers' step
}

SAMPLING_SLOT_NAMES: tuple[str, ...] = tuple(_SLOTS)


def sampling_slots() -> list[InputSlot]:
    """The six per-request sampling slots, in ``SAMPLING_SLOT_NAMES`` order, each a scalar per row.

    temperature float32 (0: greedy), top_k int32 (0: off), top_p float32 (1.0: off), min_p float32 (0.0: off),
    seed int64, counter int64 (tokens generated so far). Fills: a padded row is greedy with every filter off.
    """
    return [InputSlot(name, dtype, fill=fill) for name, (dtype, fill) in _SLOTS.items()]
