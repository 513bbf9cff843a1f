"""Happens-before for the SIMULATED npu: vector clocks over streams.

The simulator runs every launch at once, in host order, so data is always current. Ordering is checked on
the side: each stream counts the tasks issued on it, a clock maps stream id -> how many of that stream's
tasks are known to have finished, and a task happens before a clock when the clock has seen it. Waiting on
an event or a stream joins clocks; a host synchronize joins the host's clock, which every later task starts
from. That is how the simulator tells a correctly ordered update from one that merely ran first here.
"""

from __future__ import annotations

from dataclasses import dataclass

Clock = dict[int, int]  # stream id -> number of that stream's tasks known to have finished


def joined(*clocks: Clock) -> Clock:
    result: Clock = {}
    for clock in clocks:
        for stream_id, seq in clock.items():
            if seq > result.get(stream_id, 0):
                result[stream_id] = seq
    return result


@dataclass(frozen=True)
class Task:
    """One unit of device work: the ``seq``-th task issued on stream ``stream_id``."""

    stream_id: int
    seq: int
    label: str

    def finished_before(self, clock: Clock) -> bool:
        return clock.get(self.stream_id, 0) >= self.seq

    def __str__(self) -> str:
        return f"{self.label} (task {self.seq} of stream {self.stream_id})"
