"""graphhal under other people's model code: each subpackage adapts one library (an optional extra)."""
