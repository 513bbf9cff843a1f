"""The ``graphhal`` command line.

    graphhal info     devices, their modes, plugins that failed to load, versions, GPUs (--json for machines)
    graphhal bench    eager vs graphhal's modes vs a hand-written graph floor vs torch.compile, on the
                      reference model (the measuring harness is the package graphhal.bench)
    graphhal demo     one quick capture of the reference decoder: graph vs eager step time and agreement
"""
