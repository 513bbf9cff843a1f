"""The names a bench result is keyed by: its phases and the contenders that are more than a graph mode.

They are the values of the JSON's ``phase`` and ``mode`` fields and the labels of the table, and more than one
part of the harness reads them (contenders, setup measurements, results), so each is spelled here once.
Graph modes are graphhal's own names (``hal.GraphMode``) and keep them.
"""

DECODE = "decode"
PREFILL = "prefill"
SETUP = "setup"  # what a server pays at startup, measured apart from the step timings

# The parts of the step tables besides the phases', in the order a run announces them (``run_bench``).
STEP_TABLE_HEADER = "header"  # the device, the model and the clock
STEP_TABLE_LEGEND = "legend"  # against transformers, and what each mode ran

EAGER = "eager"  # the baseline every row's speedup is against; always runs, first
FLOOR = "floor"  # the hand-written graph every row's overhead is against
FULL_INDUCTOR = "full+inductor"  # graphhal's full mode over an Inductor-compiled forward
FULL_FIRST_REPLAY_CHECK = "full (first-replay check)"  # full, addresses checked on a bucket's first replay only
REDUCE_OVERHEAD = "reduce-overhead"  # torch.compile's own graphs: graphhal's peer
STATIC_REDUCE_OVERHEAD = "reduce-overhead dynamic=False"  # a setup only: one compile per batch size
TRANSFORMERS_EAGER = "transformers eager"  # transformers' own decode step with its default cache (--model llama...)
TRANSFORMERS_STATIC_COMPILE = "transformers static+compile"  # its StaticCache + torch.compile fast path
