"""Support code for graphhal's tests (not shipped): a CPU simulator of torch_npu's graph API and its fixtures."""
