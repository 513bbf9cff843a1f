"""The ``graphhal`` command line: ``graphhal demo`` (capture and run the reference model)."""
