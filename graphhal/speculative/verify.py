"""Greedy verification of draft tokens on the device, and the length bookkeeping that rolls rejected ones back.

A verify step runs the target model over ``q = 1 + k`` tokens per request: the last accepted token, then the
``k`` drafts. Its argmax at token ``i`` is the target's own next token after the first ``i`` drafts, so:

    target = greedy_tokens(logits)                 # [n, k + 1] int64, argmax per query token
    result = greedy_verify(target, drafts)         # drafts: [n, k] int64
    result.accepted                                # [n] drafts accepted, 0..k (longest prefix equal to target)
    result.tokens[r, : result.num_tokens[r]]       # the step's output: accepted drafts + the bonus token

Everything is tensor math of fixed shape (no ``.item()``, no host branch), so it runs inside a captured graph:
``GreedyVerifyStep`` wraps a decode step so that a runner's replay hands back accepted counts and tokens
(16 bytes and ``8 (k + 1)`` a request) instead of ``[n, q, vocab]`` logits.

KV rollback is bookkeeping only: the step wrote the K/V of all ``q`` tokens, and a request keeps those of its
input token and its accepted drafts. ``context_lens_after`` gives the cached length that counts; the next
step's ``seq_lens`` count from it, and the rejected tokens' slots are simply overwritten later. Requests with
different acceptance lengths continue in one batch: each has its own lengths and positions.

Greedy means what ``generate(do_sample=False)`` does: argmax, the first index among equal maxima (torch's
documented ``argmax`` tie rule, on every device).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch


class VerifyResult(NamedTuple):
    """What ``greedy_verify`` decides, per request (every tensor on the inputs' device, first dim requests).

    accepted:   [n] int64, how many drafts were accepted (0..k).
    tokens:     [n, k + 1] int64, the target's tokens; the first ``accepted + 1`` are the step's output (the
                accepted drafts, equal to the target's, then the target's bonus or correction token).
    num_tokens: [n] int64, ``accepted + 1``: the tokens the step produced.
    """

    accepted: torch.Tensor
    tokens: torch.Tensor
    num_tokens: torch.Tensor


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The target's greedy token at every query token: logits [n, q, vocab] -> [n, q] int64 (first index on ties)."""
    return torch.argmax(logits, dim=-1)


def greedy_verify(target_tokens: torch.Tensor, drafts: torch.Tensor) -> VerifyResult:
    """Accept the longest prefix of ``drafts`` [n, k] equal to ``target_tokens`` [n, k + 1] (the target's argmax
    per query token), plus the target's next token after it.

    Shapes are checked (on the host, from metadata: no sync); values never leave the device.
    """
    if target_tokens.dim() != 2 or drafts.dim() != 2:
        raise ValueError(
            f"greedy_verify takes target_tokens [n, k + 1] and drafts [n, k], got {tuple(target_tokens.shape)} and "
            f"{tuple(drafts.shape)}"
        )
    n, q = target_tokens.shape
    if drafts.shape[0] != n or drafts.shape[1] != q - 1:
        raise ValueError(
            f"greedy_verify: drafts {tuple(drafts.shape)} do not go with target_tokens {tuple(target_tokens.shape)}: "
            f"expected drafts of shape ({n}, {q - 1}), one fewer token per request than the target's"
        )
    if target_tokens.device != drafts.device:
        raise ValueError(
            f"greedy_verify: target_tokens and drafts must be on one device; target_tokens are on "
            f"{target_tokens.device}, drafts on {drafts.device}"
        )
    if target_tokens.dtype.is_floating_point or drafts.dtype.is_floating_point:
        raise TypeError(
            f"greedy_verify takes token ids (integer tensors), got {target_tokens.dtype} and {drafts.dtype}; pass "
            "greedy_tokens(logits) rather than the logits"
        )
    matches = (drafts == target_tokens[:, : q - 1]).to(torch.int64)
    # A draft counts only while every draft before it matched: the running product is 1 up to the first miss.
    accepted = matches.cumprod(dim=1).sum(dim=1)
    tokens = target_tokens.to(torch.int64)
    return VerifyResult(accepted, tokens, accepted + 1)


def accepted_token_mask(num_tokens: torch.Tensor, query_tokens: int) -> torch.Tensor:
    """[n, q] bool: which of ``tokens``' positions are the step's output (the first ``num_tokens`` of each row)."""
    return torch.arange(query_tokens, device=num_tokens.device)[None, :] < num_tokens[:, None]


def context_lens_after(seq_lens: torch.Tensor, num_tokens: torch.Tensor, query_tokens: int) -> torch.Tensor:
    """The cached tokens that count after a verify step: ``seq_lens - q + num_tokens``.

    ``seq_lens`` [n] are the step's (cached context plus its ``q`` new tokens); the request keeps the K/V of its
    input token and its ``accepted = num_tokens - 1`` drafts. The bonus token is not cached yet: it is the next
    step's first input token, at position ``context_lens_after``, and that step's ``seq_lens`` are this plus
    its own query tokens. Rejected drafts' cache slots stay written and are overwritten by later tokens.
    """
    return seq_lens.to(torch.int64) - query_tokens + num_tokens.to(torch.int64)


class GreedyVerifyStep(torch.nn.Module):
    """A decode step over ``q = 1 + k`` tokens per request that returns the greedy verdict instead of logits.

        step = GreedyVerifyStep(model.decode_forward(kv_cache))
        runner = DecodeRunner(step, decode_input_slots(layout, query_tokens=q), device, DecodeConfig(query_tokens=q))
        out = runner.run(batch)       # {"accepted": [n], "tokens": [n, q], "num_tokens": [n]}

    The drafts are the batch's own ``input_ids[:, 1:]`` (token 0 is the last accepted token), so the step
    needs no input besides the model's. ``keep_logits`` also returns ``"logits"`` [n, q, vocab].
    """

    def __init__(self, forward: Callable[..., Any], *, keep_logits: bool = False) -> None:
        super().__init__()
        self.forward_step = forward
        self.keep_logits = keep_logits

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        input_ids = inputs["input_ids"]
        if input_ids.dim() != 2:
            raise ValueError(
                f"GreedyVerifyStep takes input_ids [requests, 1 + k] (the last accepted token, then the drafts), got "
                f"{tuple(input_ids.shape)}: build the runner with decode_input_slots(..., query_tokens=1 + k)"
            )
        logits = self.forward_step(**inputs)
        result = greedy_verify(greedy_tokens(logits), input_ids[:, 1:])
        out = {"accepted": result.accepted, "tokens": result.tokens, "num_tokens": result.num_tokens}
        if self.keep_logits:
            out["logits"] = logits
        return out
