"""A prefill step's outputs with one row per request (each request's last token, say), beside those with one
row per token: padded to the runner's request rows in its graphs, handed back with one row per live request."""

from __future__ import annotations

import pytest
import torch

import hal
from runners import InputSlot, PrefillConfig, PrefillRunner

TOKEN_SLOTS = [InputSlot("x", torch.float32, row_shape=(4,))]
REQUEST_SLOTS = [InputSlot("query_lens", torch.int32, fill=0, role=hal.SlotRole.QUERY_LENS)]


def last_token_step(*, x: torch.Tensor, query_lens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every token doubled, and each request's last token (a padded request, of no tokens, reads row 0)."""
    ends = torch.cumsum(query_lens.long(), dim=0) - 1
    return {"hidden": x * 2, "last": x[ends.clamp(min=0)] * 2}


@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise", "disabled"])
def test_per_request_outputs_come_back_one_row_per_live_request(graph_device, mode):
    torch._dynamo.reset()
    device = hal.get_device(graph_device)
    runner = PrefillRunner(
        last_token_step, TOKEN_SLOTS, REQUEST_SLOTS, device,
        PrefillConfig(mode=mode, buckets=[4, 8], max_requests=3, show_progress=False), request_outputs=["last"],
    )
    runner.capture()
    for lens in ([3, 2], [1], [2, 2, 3]):
        x = torch.randn(sum(lens), 4, device=device.torch_device)
        query_lens = torch.tensor(lens, dtype=torch.int32)
        out = runner.run({"x": x, "query_lens": query_lens})
        expected = last_token_step(x=x, query_lens=query_lens.to(device.torch_device))
        assert out["hidden"].shape == (sum(lens), 4) and out["last"].shape == (len(lens), 4)
        torch.testing.assert_close(out["hidden"], expected["hidden"])
        torch.testing.assert_close(out["last"], expected["last"])
        kept = runner.submit({"x": x, "query_lens": query_lens}, keep=["last"]).wait()
        torch.testing.assert_close(kept["last"], expected["last"])


@pytest.mark.cpu
def test_a_per_request_output_of_another_row_count_is_refused_naming_it():
    def wrong(*, x, query_lens):
        return {"hidden": x, "last": x[:1]}

    runner = PrefillRunner(
        wrong, TOKEN_SLOTS, REQUEST_SLOTS, "cpu", PrefillConfig(mode="full", buckets=[4], max_requests=3, show_progress=False),
        request_outputs=["last"],
    )
    with pytest.raises(hal.CaptureError, match=r"output\['last'\] has shape \(1, 4\); every output tensor needs requests \(3 rows here\)"):
        runner.capture()
