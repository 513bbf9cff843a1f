"""The ``graphhal`` command line: ``info`` reports every device and every broken plugin, ``bench`` measures and
writes its table, JSON and plot, ``demo`` still runs. Everything here runs on the cpu device in seconds."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch

import hal
from support.installed_distribution import install_distribution, site  # noqa: F401 (site: fixture)
from graphhal.bench.contenders import runner_modes
from graphhal.bench.setup import compiled_setup
from graphhal.bench.results import CompiledSetup
from graphhal.cli.main import main
from graphhal.refmodel import ModelConfig
from runners import default_prefill_buckets

BROKEN_PLUGIN = "raise ImportError('libvendor.so: cannot open shared object file')\n"

# A plugin that loads, but raises when asked whether its device is there (a vendor runtime failing at probe).
RAISING_PLUGIN = """
import hal

@hal.hookimpl
def hal_device_types():
    return ["flakydev"]

@hal.hookimpl
def hal_is_available(device):
    raise RuntimeError("driver version mismatch")

@hal.hookimpl
def hal_graph_modes(device):
    return ("full",)

@hal.hookimpl
def hal_make_graph(device, mode):
    return None

@hal.hookimpl
def hal_capture_session(graph, pool, stream):
    return None

@hal.hookimpl
def hal_replay(graph):
    return None

@hal.hookimpl
def hal_synchronize(device):
    return None
"""


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- info ---------------------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_info_lists_builtin_devices_their_availability_modes_and_versions(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    lines = out.splitlines()
    cpu = next(line for line in lines if line.strip().startswith("cpu "))
    assert "available; modes: full, breakable" in cpu and "[devices.cpu, built-in]" in cpu
    cuda = next(line for line in lines if line.strip().startswith("cuda "))
    assert "[devices.cuda, built-in]" in cuda
    # With or without a GPU, every mode a runner could ask for there (breakable and piecewise build on full).
    assert "full, breakable, piecewise, disabled" in cuda
    npu = next(line for line in lines if line.strip().startswith("npu "))
    assert "not available" in npu and "[devices.npu, built-in]" in npu
    for name in ("torch", "triton", "pluggy", "torch-npu"):
        assert any(line.split()[:1] == [name] for line in lines), f"no version line for {name}"
    assert "plugins that failed to load: none" in out


def test_info_probes_torch_npu_without_importing_it(capsys):
    already_imported = "torch_npu" in sys.modules
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    assert "torch-npu" in json.loads(out)["versions"]
    assert ("torch_npu" in sys.modules) == already_imported


def test_info_lists_a_plugin_that_fails_to_import_in_text_and_json(site: Path, capsys):
    install_distribution(site, "broken_plugin", {"brokendev": "brokendev_impl"}, {"brokendev_impl": BROKEN_PLUGIN})

    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert "plugins that failed to load:" in out
    assert (
        "brokendev (entry point brokendev = brokendev_impl (broken_plugin)): "
        "ImportError: libvendor.so: cannot open shared object file"
    ) in out
    assert "cpu      available" in out  # the others are still listed and usable

    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["broken_plugins"] == [
        {
            "name": "brokendev",
            "origin": "entry point brokendev = brokendev_impl (broken_plugin)",
            "reason": "ImportError: libvendor.so: cannot open shared object file",
        }
    ]
    devices = {device["type"]: device for device in data["devices"]}
    assert {"cpu", "cuda", "npu"} <= devices.keys() and "brokendev" not in devices
    assert devices["cpu"]["available"] and "full" in devices["cpu"]["modes"]
    assert devices["npu"]["available"] is False and devices["npu"]["modes"] is None
    # What runners could ask for where a GPU is present, whether or not one is: the device's full graphs and the
    # strategies hal builds on them, as Device.modes lists them.
    assert devices["cuda"]["graph_modes"] == ["full", "breakable", "piecewise", "disabled"]


def test_info_reports_a_plugin_that_raises_when_probed_and_lists_the_rest(site: Path, capsys):
    install_distribution(site, "flaky_plugin", {"flakydev": "flakydev_impl"}, {"flakydev_impl": RAISING_PLUGIN})
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    devices = {device["type"]: device for device in json.loads(out)["devices"]}
    assert devices["flakydev"]["available"] is False
    assert devices["flakydev"]["error"] == "plugin 'flakydev' raised in hal_is_available: RuntimeError: driver version mismatch"
    assert devices["flakydev"]["origin"] == "entry point flakydev = flakydev_impl (flaky_plugin)"
    assert devices["cpu"]["available"]


# --- bench --------------------------------------------------------------------------------------------------

TINY_BENCH = (
    "bench", "--device", "cpu", "--model", "tiny", "--batch-sizes", "1,2", "--modes", "floor,full,breakable",
    "--prefill-modes", "breakable", "--tokens", "8", "--requests", "2", "--capture-max-bs", "4", "--setup", "all",
    # Few, short repeats: these tests check what is reported, not how precisely.
    "--time-budget", "0.02", "--min-repeats", "3", "--max-repeats", "5", "--no-progress",
)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny bench run shared by the tests below: exit code, terminal output, JSON, and the PNG path if
    matplotlib is installed."""
    out_dir = tmp_path_factory.mktemp("bench")
    json_path, png_path = out_dir / "bench.json", out_dir / "bench.png"
    argv = [*TINY_BENCH, "--json", str(json_path)]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(png_path)]
    except ImportError:
        png_path = None
    threads_before = torch.get_num_threads()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # capsys is per test; this output is shared by several
        code = main(argv)
    return {"code": code, "threads_before": threads_before, "out": out.getvalue(), "json": json.loads(json_path.read_text()), "png": png_path}


@pytest.mark.cpu
def test_bench_prints_a_table_of_every_mode_at_every_batch_size(tiny_bench):
    assert tiny_bench["code"] == 0, tiny_bench["out"]
    assert torch.get_num_threads() == tiny_bench["threads_before"]  # the bench's 1 thread was given back
    out = tiny_bench["out"]
    assert out.startswith("graphhal bench on cpu (devices.cpu, 1 thread), torch ")
    assert "batch  mode" in out and "ms/step  vs eager  / floor  setup s  pool MiB" in out
    table = [line.split() for line in out.splitlines()]
    for batch_size in ("1", "2"):
        modes = [cells[1] for cells in table if len(cells) > 2 and cells[0] == batch_size]
        assert modes[:4] == ["eager", "floor", "full", "breakable"], modes
    assert "capture: 3 decode buckets up to 4 (full, one pool)" in out  # buckets 4, 2, 1
    assert "one break:" in out


@pytest.mark.cpu
def test_bench_prints_its_step_tables_before_it_measures_capture_and_setup(monkeypatch, capsys):
    from graphhal.bench.setup import capture_cost

    printed_before = []
    measure = capture_cost.measure_capture_cost

    def noting_what_was_printed(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)
        return measure(*args, **kwargs)

    monkeypatch.setattr(capture_cost, "measure_capture_cost", noting_what_was_printed)
    assert main(list(TINY_BENCH)) == 0
    (before,) = printed_before
    assert "\ndecode\n" in before and "\nprefill\n" in before and "capture:" not in before  # the tables, not yet the rest
    after = capsys.readouterr().out
    assert after.startswith("\ncapture: 3 decode buckets") and "bench took" in after


def test_bench_prints_the_header_before_timing_and_the_decode_table_before_prefill_starts(monkeypatch, capsys):
    """On a GPU the compiled contenders take minutes: each part is printed the moment it is known."""
    from graphhal.bench import run as bench_run
    from graphhal.bench.measurements import Measurements

    printed_at = {}
    size, measure_prefill = Measurements.size, bench_run._measure_prefill

    def first_decode_size(self, phase, *args, **kwargs):
        printed_at.setdefault(f"first {phase} size", capsys.readouterr().out)
        return size(self, phase, *args, **kwargs)

    def first_prefill_shape(*args, **kwargs):
        printed_at.setdefault("first prefill shape", capsys.readouterr().out)
        return measure_prefill(*args, **kwargs)

    monkeypatch.setattr(Measurements, "size", first_decode_size)
    monkeypatch.setattr(bench_run, "_measure_prefill", first_prefill_shape)
    argv = list(TINY_BENCH)
    del argv[argv.index("--setup"):argv.index("--setup") + 2]  # the step tables alone (the capture cost after them)
    assert main(argv) == 0
    before_decode = printed_at["first decode size"]
    assert before_decode.startswith("graphhal bench on cpu") and "\ndecode\n" not in before_decode
    decode_table = printed_at["first prefill shape"]
    assert decode_table.startswith("\ndecode\n") and "\nprefill\n" not in decode_table
    assert all(f"{batch:>5}  eager" in decode_table for batch in (1, 2))
    rest = capsys.readouterr().out
    assert rest.startswith("\nprefill\n") and "bench took" in rest


@pytest.mark.cpu
def test_bench_json_holds_every_row_with_ratios_against_eager_and_the_floor(tiny_bench):
    data = tiny_bench["json"]
    assert data["schema_version"] == 1
    assert data["header"]["device"] == "cpu" and data["header"]["clock"] == "perf_counter + synchronize"
    assert data["header"]["model"] == ModelConfig.tiny().__dict__
    decode = [row for row in data["rows"] if row["phase"] == "decode"]
    assert {(row["mode"], row["batch_size"]) for row in decode} == {
        (mode, size) for mode in ("eager", "floor", "full", "breakable") for size in (1, 2)
    }
    for row in decode:
        assert row["median_ms"] > 0 and 3 <= row["repeats"] <= 5 and row["steps_per_repeat"] >= 1
        eager = next(r for r in decode if r["mode"] == "eager" and r["batch_size"] == row["batch_size"])
        floor = next(r for r in decode if r["mode"] == "floor" and r["batch_size"] == row["batch_size"])
        assert row["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / row["median_ms"])
        assert row["ratio_to_floor"] == pytest.approx(row["median_ms"] / floor["median_ms"])
        if row["mode"] == "eager":
            assert row["setup_s"] is None and row["max_abs_diff"] is None
        else:  # graphs were built, and they compute what eager computes
            assert row["setup_s"] > 0 and row["pool_bytes"] > 0
            assert row["max_abs_diff"] < 1e-4
    assert data["failed"] == []


@pytest.mark.cpu
def test_bench_json_capture_cost_compares_all_buckets_with_the_largest_and_prices_one_break(tiny_bench):
    cost = tiny_bench["json"]["capture_cost"]
    assert cost["max_bs"] == 4 and cost["num_buckets"] == 3 and cost["capture_s"] > 0
    assert cost["pool_ratio"] == pytest.approx(cost["pool_bytes_all"] / cost["pool_bytes_largest"])
    assert cost["breaks"] == ModelConfig.tiny().num_layers  # the attention of every layer is a break point
    rows = {row["mode"]: row for row in tiny_bench["json"]["rows"] if row["batch_size"] == 1}
    assert cost["full_bs1_ms"] == rows["full"]["median_ms"]  # taken from the table, not measured twice
    expected = (rows["breakable"]["median_ms"] - rows["full"]["median_ms"]) * 1e3 / cost["breaks"]
    assert cost["break_cost_us"] == pytest.approx(expected)


@pytest.mark.cpu
def test_bench_setup_cost_skips_the_compiled_setups_on_cpu_saying_why(tiny_bench):
    out, data = tiny_bench["out"], tiny_bench["json"]
    assert data["setup_cost"]["max_bs"] == 4 and data["setup_cost"]["decode"] == []
    reasons = {s["mode"]: s["reason"] for s in data["skipped"] if s["phase"] == "setup"}
    assert reasons["reduce-overhead"] == reasons["reduce-overhead dynamic=False"] == (
        "n/a: reduce-overhead records CUDA graphs (CUDA only)"
    )
    assert "cannot capture mode 'full' with compiler 'inductor'" in reasons["full+inductor"]
    assert "setup: compiled decode graphs for every bucket up to 4: none measured (why: under skipped" in out
    assert "  setup reduce-overhead: n/a: reduce-overhead records CUDA graphs (CUDA only)" in out


@pytest.mark.cpu
def test_bench_setup_cost_captures_every_default_prefill_bucket_in_every_mode(tiny_bench):
    prefill = tiny_bench["json"]["setup_cost"]["prefill"]
    # On cpu the default max_tokens is the tiny model's max_seq_len: 4..32 step 4, 48, 64.
    buckets = default_prefill_buckets(ModelConfig.tiny().max_seq_len)
    assert [(s["mode"], s["max_tokens"], s["num_buckets"]) for s in prefill] == [
        ("full", 64, len(buckets)), ("breakable", 64, len(buckets)), ("piecewise", 64, len(buckets)),
    ]
    full, breakable, piecewise = prefill
    assert full["compiles"] == 0
    assert piecewise["compiles"] == 1  # one torch.compile serves every bucket
    assert breakable["compiles"] == 0  # breakable captures the model as written
    assert all(s["setup_s"] > 0 and s["pool_bytes"] > 0 and s["max_requests"] == 64 for s in prefill)
    lines = tiny_bench["out"].splitlines()
    start = lines.index("setup: prefill graphs for every default bucket up to 64 tokens (64 requests)")
    assert lines[start + 1].split() == ["mode", "buckets", "setup", "s", "compiles", "pool", "MiB"]
    assert lines[start + 4].split()[:4] == ["piecewise", str(len(buckets)), f"{piecewise['setup_s']:.2f}", "1"]


@pytest.mark.cpu
def test_bench_setup_flags_skip_each_part_or_size_the_prefill_setup(capsys, tmp_path):
    quick = ("--batch-sizes", "1", "--modes", "full", "--tokens", "8", "--requests", "1", "--capture-max-bs", "2",
             "--time-budget", "0", "--min-repeats", "1", "--max-repeats", "1", "--no-progress")
    json_path = tmp_path / "bench.json"
    code, out, _ = run_cli(
        capsys, "bench", "--device", "cpu", *quick, "--setup", "prefill", "--prefill-setup-max-tokens", "16",
        "--json", str(json_path),
    )
    assert code == 0
    cost = json.loads(json_path.read_text())["setup_cost"]
    assert cost["max_bs"] is None and cost["decode"] == []  # not asked for, so neither run nor listed as skipped
    assert [(s["mode"], s["num_buckets"]) for s in cost["prefill"]] == [("full", 4), ("breakable", 4), ("piecewise", 4)]  # 4..16
    assert "setup: compiled decode graphs" not in out and "setup full+inductor" not in out
    assert "not measured: the compiled, restart setup(s); add --setup compiled,restart" in out

    # The default run: the step-time tables only, saying what it left out and how to add it.
    code, out, _ = run_cli(capsys, "bench", "--device", "cpu", *quick, "--json", str(json_path))
    assert code == 0 and json.loads(json_path.read_text())["setup_cost"] is None
    assert "setup:" not in out
    assert "not measured: the compiled, restart, prefill setup(s); add --setup compiled,restart,prefill (minutes on a GPU)" in out


@pytest.mark.cpu
def test_bench_compiled_setups_table_compares_full_inductor_with_each_reduce_overhead_setup(monkeypatch, capsys, tmp_path):
    """The CUDA-only measurements, faked so the run's wiring shows on cpu: what is measured, in which order,
    at which sizes, and how the extrapolated setup is labelled and compared."""
    calls = []

    def full_inductor(bench, max_bs, show_progress):
        calls.append(("full+inductor", max_bs))
        return CompiledSetup("full+inductor", "runner", [4, 2, 1], 3, setup_s=6.0, compiles=1, pool_bytes=2**20)

    def reduce_overhead(bench, sizes, num_buckets, show_progress, *, dynamic=True):
        calls.append(("reduce-overhead" if dynamic else "reduce-overhead dynamic=False", sizes))
        if dynamic:
            return CompiledSetup("reduce-overhead", "ro", sizes, num_buckets, setup_s=12.0, compiles=2, pool_bytes=2**21)
        return CompiledSetup("reduce-overhead dynamic=False", "ro", sizes, num_buckets, setup_s=10.0, compiles=1, pool_bytes=2**20)

    monkeypatch.setattr(compiled_setup, "skip_reasons", lambda device: {})
    monkeypatch.setattr(compiled_setup, "warm_up_compiler", lambda device: None)
    monkeypatch.setattr(compiled_setup, "full_inductor", full_inductor)
    monkeypatch.setattr(compiled_setup, "reduce_overhead", reduce_overhead)
    json_path = tmp_path / "bench.json"
    code, out, _ = run_cli(
        capsys, "bench", "--device", "cpu", "--batch-sizes", "1", "--modes", "full", "--no-prefill",
        "--capture-max-bs", "4", "--static-sizes", "1,8", "--time-budget", "0", "--min-repeats", "1",
        "--max-repeats", "1", "--no-progress", "--setup", "compiled", "--json", str(json_path),
    )
    assert code == 0, out
    # Every bucket largest first; the dynamic=False subset keeps the sizes a max_bs of 4 serves.
    assert calls == [("full+inductor", 4), ("reduce-overhead", [4, 2, 1]), ("reduce-overhead dynamic=False", [1])]
    assert "setup: compiled decode graphs for all 3 buckets up to 4, cold Inductor/Triton caches" in out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith(("full+inductor ", "reduce-overhead"))}
    assert rows["full+inductor"][1:] == ["3", "6.00", "1", "1.0", "6.00", "s"]
    assert rows["reduce-overhead dynamic=False"][2:] == ["1", "10.00", "1", "1.0", "30.00", "s", "extrapolated"]
    assert "  reduce-overhead dynamic=False: ro; measured at sizes 1 only: 10.00 s per size x 3 buckets = extrapolated" in out
    assert "full+inductor setup / reduce-overhead: 0.50x; / reduce-overhead dynamic=False: 0.20x (extrapolated)" in out
    decode = json.loads(json_path.read_text())["setup_cost"]["decode"]
    assert [(s["contender"], s["extrapolated_s"], s["full_inductor_ratio"]) for s in decode] == [
        ("full+inductor", None, None), ("reduce-overhead", None, 0.5), ("reduce-overhead dynamic=False", 30.0, 0.2),
    ]


@pytest.mark.cpu
def test_bench_records_a_failing_setup_and_measures_the_others(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor crashed")

    monkeypatch.setattr(compiled_setup, "skip_reasons", lambda device: {})
    monkeypatch.setattr(compiled_setup, "warm_up_compiler", lambda device: None)
    monkeypatch.setattr(compiled_setup, "full_inductor", broken)
    monkeypatch.setattr(
        compiled_setup, "reduce_overhead",
        lambda bench, sizes, n, show, dynamic=True: CompiledSetup("reduce-overhead", "", sizes, n, 1.0, 1),
    )
    code, out, _ = run_cli(
        capsys, "bench", "--device", "cpu", "--batch-sizes", "1", "--modes", "full", "--no-prefill",
        "--capture-max-bs", "2", "--time-budget", "0", "--min-repeats", "1", "--max-repeats", "1", "--no-progress",
        "--setup", "compiled",
    )
    assert code == 1
    assert "FAILED:\n  setup full+inductor @ 2 buckets up to 2: RuntimeError: inductor crashed" in out
    assert "full+inductor setup /" not in out  # no ratio without its reference


@pytest.mark.cpu
def test_bench_prefill_runs_eager_and_each_runner_mode_at_each_shape(tiny_bench):
    prefill = [row for row in tiny_bench["json"]["rows"] if row["phase"] == "prefill"]
    # The asked-for shape, then the mixed batch of 4 decodes beside a 16-token chunk (on cpu by default).
    assert [(row["mode"], row["tokens"], row["requests"], row["decodes"]) for row in prefill] == [
        ("eager", 8, 2, None), ("breakable", 8, 2, None), ("eager", 20, 5, 4), ("breakable", 20, 5, 4),
    ]
    assert "1+4d" in tiny_bench["out"]
    breakable = prefill[1]
    assert breakable["setup_s"] > 0 and breakable["pool_bytes"] > 0
    assert breakable["max_abs_diff"] < 1e-4
    assert breakable["ratio_to_floor"] is None  # no floor for prefill


@pytest.mark.cpu
def test_bench_writes_a_png_plot(tiny_bench):
    pytest.importorskip("matplotlib")
    png = tiny_bench["png"]
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in tiny_bench["out"]


@pytest.mark.cpu
def test_bench_plot_without_matplotlib_fails_before_measuring(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError

    def measured(*args, **kwargs):
        raise AssertionError("the bench ran before finding matplotlib missing")

    monkeypatch.setattr("graphhal.cli.bench.run_bench", measured)
    code, _, err = run_cli(capsys, "bench", "--device", "cpu", "--plot", str(tmp_path / "x.png"))
    assert code == 2
    assert "pip install 'graphhal[plot]'" in err


@pytest.mark.cpu
def test_bench_lists_contenders_the_device_cannot_run_as_skipped(capsys):
    code, out, _ = run_cli(
        capsys, "bench", "--device", "cpu", "--batch-sizes", "1", "--modes", "reduce-overhead,full+inductor",
        "--no-prefill", "--no-capture-cost", "--time-budget", "0", "--min-repeats", "1", "--max-repeats", "1",
        "--no-progress",
    )
    assert code == 0
    skipped = out[out.index("skipped:"):]
    assert "decode reduce-overhead: n/a: reduce-overhead records CUDA graphs (CUDA only)" in skipped
    assert "decode full+inductor: " in skipped  # cpu graphs cannot capture Inductor kernels (or no compiler option)
    assert [line.split()[1] for line in out.splitlines() if line.startswith("    1  ")] == ["eager"]


@pytest.mark.cpu
def test_bench_reports_a_failing_mode_keeps_the_others_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    def broken_prepare(self, bench, batch):
        raise RuntimeError("capture went wrong")

    monkeypatch.setattr(runner_modes.DecodeRunnerMode, "prepare", broken_prepare)
    json_path = tmp_path / "bench.json"
    code, out, err = run_cli(
        capsys, "bench", "--device", "cpu", "--batch-sizes", "1", "--modes", "floor,full", "--no-prefill",
        "--no-capture-cost", "--time-budget", "0", "--min-repeats", "1", "--max-repeats", "1", "--no-progress",
        "--json", str(json_path),
    )
    assert code == 1
    assert "FAILED:\n  decode full @ 1: RuntimeError: capture went wrong" in out
    assert "1 measurement(s) failed" in err
    data = json.loads(json_path.read_text())
    assert [row["mode"] for row in data["rows"]] == ["eager", "floor"]
    assert data["failed"] == [{"phase": "decode", "mode": "full", "size": "1", "error": "RuntimeError: capture went wrong"}]


def test_bench_rejects_an_unknown_mode_by_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--modes", "full,fastest"])
    assert exit_info.value.code == 2
    assert "unknown fastest; choose from floor, full, breakable, piecewise" in capsys.readouterr().err


# --- demo ---------------------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_demo_still_runs_and_reports_graph_and_eager_agreeing(capsys):
    code, out, _ = run_cli(
        capsys, "demo", "--device", "cpu", "--layers", "1", "--batch-sizes", "1,2", "--context-len", "16",
        "--steps", "1", "--repeats", "1",
    )
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 2
    assert all(float(cells[-1]) < 1e-3 for cells in rows)  # max |graph - eager|


@pytest.mark.cpu
def test_bench_runs_a_transformers_family_beside_transformers_own_decode_step():
    pytest.importorskip("transformers")
    argv = [
        "bench", "--device", "cpu", "--model", "qwen2", "--batch-sizes", "1,2",
        "--modes", "floor,full,transformers eager,transformers static+compile",
        "--prefill-modes", "full", "--tokens", "8", "--requests", "2", "--no-capture-cost",
        "--time-budget", "0.02", "--min-repeats", "3", "--max-repeats", "5", "--no-progress",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    text = out.getvalue()
    assert code == 0, text
    assert "transformers Qwen2ForCausalLM" in text
    rows = [line.split() for line in text.splitlines()]
    for batch_size in ("1", "2"):
        modes = [" ".join(cells[1:3]) for cells in rows if len(cells) > 2 and cells[0] == batch_size]
        assert [mode.split()[0] for mode in modes[:3]] == ["eager", "floor", "full"], modes
        assert "transformers eager" in modes, modes  # after graphhal's rows
        # graphhal's rows are checked against eager's output: the model on graphhal attention computes it
        full = next(cells for cells in rows if len(cells) > 2 and cells[0] == batch_size and cells[1] == "full")
        assert float(full[-3]) < 1e-4, full
    assert "against transformers' own decode steps" in text and "transformers eager / full = " in text
    assert "decode transformers static+compile: n/a: reduce-overhead records CUDA graphs (CUDA only)" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--spec", "--observe"], "--spec and --observe are benches of their own; run one at a time"),
        (["--generation", "--tp", "2"], "--generation takes no --tp"),
        (["--observe", "--json", "out.json"], "--observe takes no --json"),
    ],
)
def test_bench_refuses_flags_its_own_benches_would_drop(argv, message, capsys):
    # Before anything is measured: --spec, --observe and --generation each replace the main bench, which alone
    # takes --tp, --json and --plot; a combination used to run one of them and drop the rest silently.
    with pytest.raises(SystemExit) as raised:
        main(["bench", *argv])
    assert message in str(raised.value)
