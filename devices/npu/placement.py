"""Where the tensors of an npu device live: the one seam between the npu plugin and the machine under it.

On Ascend hardware, npu device ``i`` keeps its tensors on ``torch.device("npu", i)`` (the PrivateUse1 backend
torch_npu registers under that name). A simulator of torch_npu keeps them elsewhere (graphhal's test
simulator uses the CPU) and says so with ``tensors_on``. Nothing else in the plugin knows whether it is
talking to hardware.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

_placement: Callable[[int], torch.device] | None = None


def torch_device(index: int) -> torch.device:
    """The torch device holding npu device ``index``'s tensors."""
    if _placement is not None:
        return _placement(index)
    return torch.device("npu", index)


@contextmanager
def tensors_on(placement: Callable[[int], torch.device]) -> Iterator[None]:
    """Within the block, npu device ``i``'s tensors live on ``placement(i)`` (for simulators of torch_npu)."""
    global _placement
    previous, _placement = _placement, placement
    try:
        yield
    finally:
        _placement = previous
