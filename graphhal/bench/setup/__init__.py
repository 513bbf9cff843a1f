"""What a server pays at startup, measured apart from the step timings: capture cost, compiled and prefill setups."""
