"""``graphhal::sample``: the sampler as a torch custom op, one kernel per device, and ``sample``, what callers use.

    tokens, logprobs = sample(logits, temperature, top_k, top_p, min_p, seed, counter, max_top_k=256)

Kernels: CUDA runs ``torch.topk`` and the two Triton kernels (``graphhal.sampling.triton_sample``); every other
device (cpu, npu) runs the torch math (``graphhal.sampling.sample_reference``), which is also the definition.

Why an op and not plain functions: torch.compile (piecewise graphs, or a forward compiled by Inductor) then
keeps the sampler as one opaque node, so a compiled forward runs exactly the kernels the eager forward runs
and draws the same tokens (Inductor would otherwise re-fuse the torch math, and the logs and sums of its
kernels round differently), and the Triton launches stay out of the trace. The cpu recorded graph records
the op as one step and replays it on the captured buffers, which hold each replay's parameters.

Eager calls that nothing traces or records run the kernel directly (``graphhal.paged_attention.direct_kernels``):
the op's Python layers cost about 25 us a call.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

import hal
from graphhal.paged_attention.direct_kernels import unobserved_eager_call
from graphhal.sampling.sample_reference import DEFAULT_MAX_TOP_K, sample_reference
from graphhal.sampling.sampling_slots import sampling_slots


@torch.library.custom_op("graphhal::sample", mutates_args=())
def _sample_op(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    max_top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_reference(logits, temperature, top_k, top_p, min_p, seed, counter, max_top_k)


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, min_p, seed, counter, max_top_k):  # type: ignore[no-untyped-def]
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.int64), logits.new_empty(rows, dtype=torch.float32)


@_sample_op.register_kernel("cuda")
def _sample_cuda(logits, temperature, top_k, top_p, min_p, seed, counter, max_top_k):  # type: ignore[no-untyped-def]
    return _triton_sample()(logits, temperature, top_k, top_p, min_p, seed, counter, max_top_k)


@functools.cache
def _triton_sample() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    # Imported on the first CUDA call so that `import graphhal.sampling` needs neither triton nor CUDA.
    from graphhal.sampling.triton_sample import sample_triton

    return sample_triton


_op = torch.ops.graphhal.sample.default
_PARAMETER_DTYPES = {slot.name: slot.dtype for slot in sampling_slots()}
# What an eager call that nothing watches runs instead of the op, by device type: what the op dispatches to.
_DIRECT_KERNELS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"cuda": _sample_cuda}

# Every parameter is read from device memory, in batches of any kind: capturable anywhere.
hal.declare_graph_support(_op, hal.GraphSupport.ANY_BATCH)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    *,
    max_top_k: int = DEFAULT_MAX_TOP_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [rows, vocab] (float32, float16 or bfloat16).

    Parameters are [rows] tensors on the logits' device, with the dtypes of ``sampling_slots()``: temperature
    float32 (0: greedy), top_k int32 (0: off), top_p float32 (1.0: off), min_p float32 (0.0: off), seed int64,
    counter int64 (tokens the request generated so far). ``max_top_k``: how many candidates top-k and top-p
    search (a capture-time constant; a request's top_k above it must have been refused, see
    ``check_sampling_params``).

    Returns (token ids [rows] int64, log-probabilities of those tokens under ``log_softmax(logits)``
    [rows] float32). The semantics are ``sample_reference``'s module docstring.
    """
    if not isinstance(max_top_k, int) or isinstance(max_top_k, bool) or max_top_k < 1:
        raise ValueError(f"sample: max_top_k must be a positive int (a capture-time constant), got {max_top_k!r}")
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    parameters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, counter=counter)
    for name, tensor in parameters.items():
        # Checked, not cast: a cast would be a copy per step, and the kernels read each dtype as it is.
        if tensor.dtype != _PARAMETER_DTYPES[name] or tensor.shape != logits.shape[:1]:
            raise TypeError(
                f"sample: {name} must be a [{logits.shape[0]}] tensor of {_PARAMETER_DTYPES[name]} (one value per row "
                f"of the logits), got {tuple(tensor.shape)} {tensor.dtype}"
            )
    arguments = (logits, temperature, top_k, top_p, min_p, seed, counter, max_top_k)
    if unobserved_eager_call(logits):
        return _DIRECT_KERNELS.get(logits.device.type, sample_reference)(*arguments)
    return _op(*arguments)
