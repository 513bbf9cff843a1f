"""transformers causal LMs on graphhal's runners, with a paged KV cache (the ``hf`` extra).

    from graphhal.transformers import paged_kv_cache, decode_runner, prefill_runner, GenerationLoop

- ``attention``: graphhal's paged attention, registered in transformers' ``AttentionInterface`` as
  ``"graphhal"``; the model's own code is not touched.
- ``kv_cache``: a paged KV cache sized from the model's config.
- ``builders``: a ``DecodeRunner`` and a ``PrefillRunner`` for a model, in any mode the device offers.
- ``generation``: a greedy generation loop with continuous batching, the example of a server using them;
  ``request_checks``: what it accepts as a request.

Works for decoder models whose attention transformers dispatches by name (``_supports_attention_backend``):
tested on the Llama, Qwen2 and Mistral families. Others get ``UnsupportedModelError`` naming what is missing.
"""

from graphhal.transformers.attention import (
    ATTENTION_NAME,
    MissingBatchError,
    UnsupportedModelError,
    register_graphhal_attention,
    use_graphhal_attention,
)
from graphhal.transformers.builders import decode_runner, prefill_runner
from graphhal.transformers.generation import GenerationLoop, RequestFailedError, StepResult
from graphhal.transformers.kv_cache import cache_shape, paged_kv_cache

__all__ = [
    "ATTENTION_NAME",
    "GenerationLoop",
    "MissingBatchError",
    "RequestFailedError",
    "StepResult",
    "UnsupportedModelError",
    "cache_shape",
    "decode_runner",
    "paged_kv_cache",
    "prefill_runner",
    "register_graphhal_attention",
    "use_graphhal_attention",
]
