"""transformers causal LMs on graphhal's runners, with a paged KV cache (the ``hf`` extra).

    from graphhal.transformers import paged_kv_cache, decode_runner, prefill_runner, GenerationLoop

- ``attention``: graphhal's paged attention, registered in transformers' ``AttentionInterface`` as
  ``"graphhal"``; the model's own code is not touched.
- ``kv_cache``: a paged KV cache sized from the model's config.
- ``builders``: a ``DecodeRunner`` and a ``PrefillRunner`` for a model, in any mode the device offers.
- ``generation``: a greedy generation loop with continuous batching, the example of a server using them;
  ``request_checks``: what it accepts as a request.
- ``layers`` and ``experts``: what graphhal serves of a model, checked before a runner is built.
- ``tensor_parallel``: a model split over a process group by its own plan (``base_model_tp_plan``), with
  graphhal's all-reduce, so that its steps are captured like any other.

Works for decoder models whose attention transformers dispatches by name (``_supports_attention_backend``) in
every decoder layer: tested (generation equal to ``generate``) on Llama, Qwen2, Mistral, Qwen3, Gemma, Gemma 3
(text), Phi-3, OLMo 2, Granite, Mixtral, Qwen2-MoE and Qwen3-MoE. Others get ``UnsupportedModelError`` naming
what is missing: hybrid models (a convolution, state-space or linear-attention layer beside attention),
attention logit soft-capping (Gemma 2), sliding windows or attention chunks shorter than the served length,
and experts that would read their routing on the host inside a graph. A step whose model no longer calls
graphhal's attention raises ``AttentionSwitchedError``.
"""

from graphhal.transformers.attention import (
    ATTENTION_NAME,
    AttentionSwitchedError,
    MissingBatchError,
    UnsupportedModelError,
    register_graphhal_attention,
    use_graphhal_attention,
)
from graphhal.transformers.builders import decode_runner, prefill_runner
from graphhal.transformers.generation import GenerationLoop, RequestFailedError, StepResult
from graphhal.transformers.kv_cache import cache_shape, paged_kv_cache
from graphhal.transformers.drafters import draft_model_drafter
from graphhal.transformers.tensor_parallel import ModelShard, shard_model, shard_of

__all__ = [
    "ATTENTION_NAME",
    "AttentionSwitchedError",
    "GenerationLoop",
    "MissingBatchError",
    "ModelShard",
    "RequestFailedError",
    "StepResult",
    "UnsupportedModelError",
    "cache_shape",
    "decode_runner",
    "draft_model_drafter",
    "paged_kv_cache",
    "prefill_runner",
    "register_graphhal_attention",
    "shard_model",
    "shard_of",
    "use_graphhal_attention",
]
