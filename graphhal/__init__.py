"""graphhal: device graphs for LLM inference on any accelerator.

The layers a server builds on are top-level packages of their own: ``hal`` (the device contract and its
facade), ``devices`` (the built-in device plugins) and ``runners`` (``DecodeRunner``, ``PrefillRunner``).
Everything else graphhal ships lives here, under one name:

    graphhal.paged_attention   the paged attention ops and KV cache (reference model and transformers share them)
    graphhal.refmodel          a small Llama-style decoder: the model the tests, demo and bench run
    graphhal.transformers      Hugging Face causal LMs on the runners (extra ``hf``)
    graphhal.sampling          sampling inside the captured step: per-request parameters as slots, token ids out
    graphhal.bench             the measuring harness behind ``graphhal bench``
    graphhal.cli               the ``graphhal`` command (info, bench, demo)
"""

__version__ = "0.1.0"
