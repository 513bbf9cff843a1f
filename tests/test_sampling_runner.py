"""Sampling inside the captured step: through a DecodeRunner, in every mode, the reference decoder's sampled
tokens equal eager sampling step after step, and every parameter is read at replay, never baked in.

On every device with graphs (cpu here: the recorded graph bakes every host value, as a GPU graph would; cuda
on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch

import hal
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from graphhal.sampling import SampledStep, SamplingParams, sample_reference, sampling_inputs, sampling_slots
from runners import DecodeConfig, DecodeRunner, InputSlot

MODES = ["full", "breakable", "piecewise", "disabled"]
REQUESTS = 5  # bucket 8: three padded rows
MAX_TOP_K = 16

# One request of each kind; the tiny model's 256-token vocabulary is spread out enough at these temperatures
# that each filter changes what is drawn.
PARAMS = [
    SamplingParams.greedy(),
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(temperature=1.5, top_k=5, seed=12),
    SamplingParams(temperature=1.2, top_p=0.8, seed=-13),
    SamplingParams(temperature=2.0, min_p=0.1, top_k=MAX_TOP_K, seed=2**40),
]


class SampledDecoder:
    """The tiny reference decoder behind a SampledStep, a workload of REQUESTS requests, and a runner."""

    def __init__(self, device_name: str, mode: str) -> None:
        torch._dynamo.reset()  # piecewise compiles the step: start each runner from scratch
        self.device = hal.get_device(device_name)
        config = ModelConfig.tiny()
        torch_device = self.device.torch_device
        self.kv_cache = PagedKVCache(config, num_blocks=1 + REQUESTS * config.max_blocks_per_seq, device=torch_device, dtype=torch.float32)
        self.model_step = LlamaDecoder(config, torch_device, torch.float32, seed=0).decode_forward(self.kv_cache)
        self.step = SampledStep(self.model_step, max_top_k=MAX_TOP_K)
        self.workload = DecodeWorkload(self.kv_cache, REQUESTS, max_context_len=20, seed=1)
        self.runner = DecodeRunner(
            self.step,
            self.step.input_slots(self.workload.input_slots()),
            self.device,
            DecodeConfig(mode=mode, buckets=[1, 2, 4, 8], show_progress=False),
        )
        self.runner.capture()

    def batch(self, params: list[SamplingParams], counters: list[int]) -> dict[str, torch.Tensor]:
        rows = len(params)
        return {**self.workload.batch(rows), **sampling_inputs(params, counters, self.device.torch_device)}

    def last_alone(self, params: SamplingParams, counter: int) -> dict[str, torch.Tensor]:
        """The last request of the workload as a batch of its own."""
        rows = {name: tensor[-1:] for name, tensor in self.workload.batch().items()}
        return {**rows, **sampling_inputs([params], [counter], self.device.torch_device)}

    def eager(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.step(**batch)

    def graph(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self.runner.run(batch).items()}


@pytest.mark.parametrize("mode", MODES)
def test_sampled_tokens_equal_eager_sampling_step_after_step_whatever_else_is_in_the_batch(graph_device, mode):
    decoder = SampledDecoder(graph_device, mode)
    counters = [0] * REQUESTS
    for _ in range(4):
        batch = decoder.batch(PARAMS, counters)
        eager = decoder.eager(batch)  # writes the new tokens' K/V; the runner rewrites the same values
        graph = decoder.graph(batch)
        assert torch.equal(graph["tokens"], eager["tokens"])
        torch.testing.assert_close(graph["logprobs"], eager["logprobs"], rtol=1e-4, atol=1e-4)
        assert graph["tokens"][0] == decoder.model_step(**decoder.workload.batch()).argmax(-1)[0]  # greedy row

        # The last request alone (row 0 of bucket 1 instead of row 4 of bucket 8, no neighbours, its own seed)
        # draws the same token.
        alone = decoder.graph(decoder.last_alone(PARAMS[-1], counters[-1]))
        assert torch.equal(alone["tokens"], graph["tokens"][-1:])

        decoder.workload.advance(graph["tokens"])
        counters = [c + 1 for c in counters]


@pytest.mark.parametrize("mode", MODES)
def test_parameters_changed_between_replays_take_effect(graph_device, mode):
    decoder = SampledDecoder(graph_device, mode)
    greedy_tokens = decoder.model_step(**decoder.workload.batch()).argmax(-1)

    def tokens(**change) -> torch.Tensor:
        params = [SamplingParams(**{"temperature": 50.0, "seed": row, **change}) for row in range(REQUESTS)]
        return decoder.graph(decoder.batch(params, [3] * REQUESTS))["tokens"]

    hot = tokens()  # nearly uniform over 256 tokens: not the argmax
    assert (hot != greedy_tokens).sum() >= 4
    assert torch.equal(tokens(temperature=0.0), greedy_tokens)
    assert torch.equal(tokens(top_k=1), greedy_tokens)
    assert torch.equal(tokens(top_p=1e-4), greedy_tokens)
    assert torch.equal(tokens(min_p=1.0), greedy_tokens)
    assert not torch.equal(tokens(seed=REQUESTS + 1), hot)  # another seed (every row's), other draws
    params = [SamplingParams(temperature=50.0, seed=row) for row in range(REQUESTS)]
    other_counter = decoder.graph(decoder.batch(params, [4] * REQUESTS))["tokens"]
    assert (other_counter != hot).sum() >= 3
    assert torch.equal(tokens(), hot)  # and back: the same draws again


def test_the_torch_math_itself_is_captured_op_by_op_without_baking_anything(graph_device):
    """The op hides its kernel from the cpu recorded graph; here the torch math is captured op by op (as on
    an npu, or wherever a capture records each op): every parameter and the logits stay live inputs."""
    vocab = 64
    slots = [InputSlot("logits", torch.float32, (vocab,)), *sampling_slots()]

    def forward(*, logits, temperature, top_k, top_p, min_p, seed, counter):
        tokens, logprobs = sample_reference(logits, temperature, top_k, top_p, min_p, seed, counter, 8)
        return {"tokens": tokens, "logprobs": logprobs}

    device = hal.get_device(graph_device)
    runner = DecodeRunner(forward, slots, device, DecodeConfig(mode="full", buckets=[4], show_progress=False))
    runner.capture()
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, seed=step * 10 + row)
                  for row, (t, k, p, m) in enumerate([(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.1), (2.0, 4, 1.0, 0.0), (1.5, 0, 0.7, 0.0)])]
        batch = {"logits": (torch.randn(4, vocab, generator=generator) * 2).to(device.torch_device),
                 **sampling_inputs(params, [step] * 4, device.torch_device)}
        expected = forward(**batch)
        out = runner.run(batch)
        assert torch.equal(out["tokens"], expected["tokens"])
        torch.testing.assert_close(out["logprobs"], expected["logprobs"], rtol=0, atol=0)


def test_sampled_step_takes_logits_as_a_tensor_a_mapping_or_an_attribute_and_refuses_name_clashes():
    logits = torch.randn(3, 1, 20)  # [rows, positions, vocab]: the last position is sampled
    inputs = sampling_inputs([SamplingParams.greedy()] * 3, [0] * 3, "cpu")
    expected = logits[:, -1].argmax(-1)

    class Output:
        def __init__(self, logits):
            self.logits = logits

    for forward in (lambda x: x, lambda x: {"logits": x, "hidden": None}, lambda x: Output(x)):
        out = SampledStep(forward)(x=logits, **inputs)
        assert set(out) == {"tokens", "logprobs"} and torch.equal(out["tokens"], expected)
    with pytest.raises(TypeError, match="returned a dict without 'logits'"):
        SampledStep(lambda x: {"scores": x})(x=logits, **inputs)
    with pytest.raises(TypeError, match=r"missing sampling inputs \['seed', 'counter'\]"):
        SampledStep(lambda x: x)(x=logits, **{k: v for k, v in inputs.items() if k not in ("seed", "counter")})
    with pytest.raises(ValueError, match=r"input slots \['seed'\] have the names of sampling slots"):
        SampledStep(lambda x: x).input_slots([InputSlot("x", torch.float32), InputSlot("seed", torch.int64)])
