"""``graphhal bench``: the reference model through graphhal's runners vs eager, a floor and torch.compile.

One module per idea:
    timing       the timing primitive (device clock, median of enough repeats)
    workload     the model, KV cache and requests every contender shares
    contenders   the decode contenders: eager, runner modes, the hand-written floor, reduce-overhead
    prefill      the prefill contenders (feature-detected: PrefillRunner is newer than this CLI)
    capture_cost capture-only measurements: all buckets' capture time and pool, one break's cost
    compiled_setup  startup for every decode bucket: full+inductor vs one reduce-overhead compile (CUDA)
    prefill_setup   startup for every prefill bucket: a piecewise and a breakable PrefillRunner
    compile_count   torch.compile's compile count, read around each setup
    agreement    each contender's output checked against eager's
    suite        the run: every contender at every size, one at a time
    results      the dataclasses the table, JSON and plot read
    table, plot  terminal output and PNG
    command      the command line
"""
