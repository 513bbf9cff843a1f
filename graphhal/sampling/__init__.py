"""Sampling on the device, inside the captured step: per-request parameters as tensors, counter-based random
numbers, token ids out.

    step = SampledStep(model_step, max_top_k=256)                  # a runner forward returning tokens
    runner = DecodeRunner(step, step.input_slots(model_slots), device)
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1234).check(max_top_k=step.max_top_k)
    out = runner.run({**model_inputs, **sampling_inputs([params, ...], counters, device)})
    out["tokens"], out["logprobs"]                                 # [rows] int64, [rows] float32

    tokens, logprobs = sample(logits, temperature, top_k, top_p, min_p, seed, counter, max_top_k=256)

- ``sampling_slots()``: temperature, top_k, top_p, min_p, seed, counter; the fills make a padded row greedy.
- Greedy (temperature 0) is ``argmax`` of the raw logits, first index on ties: ``generate(do_sample=False)``.
- Sampling is a Gumbel-max draw over the tokens top-k, top-p and min-p allow (``sample_reference``), with
  random numbers hashed from (seed, counter, token) (``random_numbers``): the same request draws the same
  tokens in every graph mode and eagerly, on one device, whatever else is in its batch (the uniforms
  themselves are the same on every device; the logits and the noise's logs are not bit for bit).
- ``graphhal::sample`` is a custom op: Triton kernels on CUDA (``triton_sample``), torch elsewhere.

Importing this package needs neither triton nor CUDA.
"""

from graphhal.sampling.random_numbers import gumbel_noise, uniforms
from graphhal.sampling.sample_op import sample
from graphhal.sampling.sample_reference import DEFAULT_MAX_TOP_K, sample_reference
from graphhal.sampling.sampled_step import SampledPrefillStep, SampledStep
from graphhal.sampling.sampling_params import MIN_TEMPERATURE, SamplingParams, check_sampling_params, sampling_inputs
from graphhal.sampling.sampling_slots import SAMPLING_SLOT_NAMES, sampling_slots

__all__ = [
    "DEFAULT_MAX_TOP_K",
    "MIN_TEMPERATURE",
    "SAMPLING_SLOT_NAMES",
    "SampledPrefillStep",
    "SampledStep",
    "SamplingParams",
    "check_sampling_params",
    "gumbel_noise",
    "sample",
    "sample_reference",
    "sampling_inputs",
    "sampling_slots",
    "uniforms",
]
