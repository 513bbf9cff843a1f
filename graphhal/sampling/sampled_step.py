"""``SampledStep``: a model's step that returns sampled tokens instead of logits, for a runner to capture.

    step = SampledStep(model_step, max_top_k=256)
    runner = DecodeRunner(step, step.input_slots(model_slots), device)
    out = runner.run({**model_inputs, **sampling_inputs(params, counters, device)})
    out["tokens"], out["logprobs"]                          # [rows] int64, [rows] float32

The sampling runs inside the captured step, so a replay hands back token ids (8 bytes a row) rather than a
vocabulary-wide logits tensor, and the tokens can feed the next step on the device.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from graphhal.sampling.sample_op import sample
from graphhal.sampling.sample_reference import DEFAULT_MAX_TOP_K
from graphhal.sampling.sampling_slots import SAMPLING_SLOT_NAMES, sampling_slots
from runners import InputSlot


class SampledStep:
    """Calls ``forward`` with the model's slots, samples from its logits with the sampling slots, and returns
    ``{"tokens": [rows] int64, "logprobs": [rows] float32}``.

    forward:    the model's step, taking its slots as keyword tensors (any runner forward). It returns the
                logits as a tensor, or a mapping or object holding them under ``logits_key`` (a transformers
                ``ModelOutput`` does both). Logits are [rows, vocab]; [rows, positions, vocab] is sampled at
                the last position.
    max_top_k:  how many candidates top-k and top-p search (see ``sample``), fixed for the graphs captured with
                this step: requests with a larger top_k must be refused (``SamplingParams.check``), and a
                nucleus needing more tokens is cut there. Default ``DEFAULT_MAX_TOP_K`` (256; why: its comment).
    logits_key: where the logits are when ``forward`` returns a mapping or an object.
    """

    def __init__(self, forward: Callable[..., Any], *, max_top_k: int = DEFAULT_MAX_TOP_K, logits_key: str = "logits") -> None:
        if not isinstance(max_top_k, int) or isinstance(max_top_k, bool) or max_top_k < 1:
            raise ValueError(f"SampledStep: max_top_k must be a positive int, got {max_top_k!r}")
        self.forward = forward
        self.max_top_k = max_top_k
        self.logits_key = logits_key

    def input_slots(self, model_slots: Sequence[InputSlot]) -> list[InputSlot]:
        """The runner's slots: the model's, then the sampling slots. ValueError if a model slot takes a
        sampling slot's name."""
        taken = sorted({slot.name for slot in model_slots} & set(SAMPLING_SLOT_NAMES))
        if taken:
            raise ValueError(
                f"SampledStep: the model's input slots {taken} have the names of sampling slots "
                f"({', '.join(SAMPLING_SLOT_NAMES)}); rename them in the model's step"
            )
        return [*model_slots, *sampling_slots()]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = [name for name in SAMPLING_SLOT_NAMES if name not in inputs]
        if missing:
            raise TypeError(f"SampledStep: missing sampling inputs {missing}; build the runner with step.input_slots(...)")
        parameters = [inputs.pop(name) for name in SAMPLING_SLOT_NAMES]
        logits = self._logits(self.forward(**inputs))
        tokens, logprobs = sample(logits, *parameters, max_top_k=self.max_top_k)
        return {"tokens": tokens, "logprobs": logprobs}

    def _logits(self, output: Any) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            logits = output
        elif isinstance(output, Mapping) and self.logits_key in output:
            logits = output[self.logits_key]
        elif hasattr(output, self.logits_key):
            logits = getattr(output, self.logits_key)
        else:
            raise TypeError(
                f"SampledStep: the forward returned a {type(output).__name__} without {self.logits_key!r}; it must "
                "return the logits, or a mapping or object holding them under logits_key"
            )
        if logits.dim() == 3:
            logits = logits[:, -1]
        return logits


class SampledPrefillStep(SampledStep):
    """A packed prefill step that samples one token per request, at the last token of the request's chunk, and
    returns ``{"tokens": [requests] int64, "logprobs": [requests] float32}``: what a prefill runner hands back
    when it is built with ``request_outputs=SampledPrefillStep.OUTPUTS``.

    Its request slots are the model's, then ``sample_rows`` (int64: the row of each request's last token among
    the batch's packed tokens) and the sampling slots, one row per request; a padded request reads row 0 and
    samples greedily there, and its token is never used. Only a request whose prompt ends in the chunk keeps
    its token; sampling the others costs a row each of the small sampler, which a graph cannot skip.
    """

    OUTPUTS = ("tokens", "logprobs")

    def __init__(
        self, forward: Callable[..., Any], *, max_top_k: int = DEFAULT_MAX_TOP_K, logits_key: str = "logits", logits_rows: bool = False
    ) -> None:
        """logits_rows: ``forward`` takes ``sample_rows`` as its ``logits_rows`` and computes logits only there
        (``PrefillRowsStep``): one row per request instead of every token's, the step's largest tensor. False:
        it returns every token's logits and the rows are picked from them."""
        super().__init__(forward, max_top_k=max_top_k, logits_key=logits_key)
        self.logits_rows = logits_rows

    def request_slots(self, model_request_slots: Sequence[InputSlot]) -> list[InputSlot]:
        """The runner's request slots: the model's, ``sample_rows``, then the sampling slots."""
        return [*self.input_slots([*model_request_slots, InputSlot("sample_rows", torch.int64, fill=0)])]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = inputs.pop("sample_rows", None)
        if rows is None:
            raise TypeError("SampledPrefillStep: missing input sample_rows; build the runner's request slots with step.request_slots(...)")
        missing = [name for name in SAMPLING_SLOT_NAMES if name not in inputs]
        if missing:
            raise TypeError(f"SampledPrefillStep: missing sampling inputs {missing}; build the runner with step.request_slots(...)")
        parameters = [inputs.pop(name) for name in SAMPLING_SLOT_NAMES]
        if self.logits_rows:
            logits = self._logits(self.forward(**inputs, logits_rows=rows))  # [requests, vocab]
        else:
            logits = self._logits(self.forward(**inputs)).index_select(0, rows)  # of [tokens, vocab]
        tokens, logprobs = sample(logits, *parameters, max_top_k=self.max_top_k)
        return {"tokens": tokens, "logprobs": logprobs}
