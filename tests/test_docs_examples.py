"""README.md and docs/*.md stay true to the code: every Python example runs, and every name they cite exists.

Examples: every ```python block runs on the cpu device, in a fresh Python process. A block marked
``<!-- example: continues -->`` (the line right before its fence) runs after the block before it on the same
page, in the same namespace, as a reader reads them in order; any other block starts a new process. A block
marked ``<!-- example: needs <what> -->`` (a GPU, a network) is skipped with that reason. Tracebacks name the
page and its line.

Names: every inline code span that names something of graphhal's (a module path such as
``hal.graph_support.OpNotCapturableError``, a file such as ``runners/capture_loop.py``, a hook ``hal_*``, an op
``graphhal::decode_attention``, a class or function such as ``RankRunError`` or ``claim_current_thread()``, a
call such as ``DecodeConfig(check_addresses="first_replay")``) must exist in the code as written, so a rename
fails here rather than leaving the docs behind. Names from other projects that the pages cite are listed in
``NOT_OURS``.
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUR_PACKAGES = ("hal", "runners", "graphhal", "devices")
EXAMPLE_TIMEOUT_S = 300

MARKER = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")


# --- the examples ------------------------------------------------------------------------------------------


@dataclass
class Block:
    page: Path
    line: int  # of the block's first line of code, 1-based
    source: str
    marker: str | None  # the <!-- example: ... --> right before the fence, if any


@dataclass
class Example:
    """Blocks run one after the other in one namespace: a block and the blocks that continue it."""

    blocks: list[Block] = field(default_factory=list)
    skip_reason: str | None = None

    @property
    def name(self) -> str:
        first = self.blocks[0]
        return f"{first.page.relative_to(ROOT) if first.page.is_relative_to(ROOT) else first.page.name}:{first.line}"


def python_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, fence_start, language = [], None, ""
    for number, line in enumerate(lines, start=1):
        match = FENCE.match(line)
        if match is None:
            continue
        if fence_start is None:
            fence_start, language = number, match.group(1)
            continue
        if language in ("python", "py"):
            before = next((lines[i].strip() for i in range(fence_start - 2, -1, -1) if lines[i].strip()), "")
            marker = MARKER.match(before)
            source = "\n".join(lines[fence_start:number - 1])
            blocks.append(Block(page, fence_start + 1, source, marker.group(1) if marker else None))
        fence_start = None
    assert fence_start is None, f"{page.relative_to(ROOT)}:{fence_start}: a code fence is never closed"
    return blocks


def examples(pages: list[Path] = PAGES) -> list[Example]:
    found: list[Example] = []
    for page in pages:
        current: Example | None = None
        for block in python_blocks(page):
            where = f"{page.name}:{block.line}"
            assert block.source.strip(), f"{where}: an empty python block"
            if block.marker == "continues":
                assert current is not None, f"{where}: 'continues' on the first python block of the page"
                current.blocks.append(block)
                continue
            current = Example([block])
            if block.marker is not None:
                assert block.marker.startswith("needs "), (
                    f"{where}: unknown example marker {block.marker!r}; the markers are 'continues' and 'needs <what>'"
                )
                current.skip_reason = f"{where} {block.marker}"
            found.append(current)
    return found


# Runs in the fresh process: every block of one example in the namespace of ``__main__`` (the module a script
# runs as: torch.compile looks a step's globals up there), compiled with the page's name and line numbers, so a
# traceback points into the page.
RUNNER = """
import __main__, json, sys
for page, line, source in json.load(sys.stdin):
    exec(compile("\\n" * (line - 1) + source, page, "exec"), __main__.__dict__)
"""


@pytest.mark.cpu
@pytest.mark.parametrize("example", [pytest.param(e, id=e.name) for e in examples()])
def test_example_runs_on_cpu(example: Example, tmp_path: Path) -> None:
    if example.skip_reason is not None:
        pytest.skip(example.skip_reason)
    blocks = [(str(b.page.relative_to(ROOT)), b.line, b.source) for b in example.blocks]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the cpu device, on a GPU machine too: what the page shows is what runs
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=tmp_path,  # files an example writes land here
        env=env,
        timeout=EXAMPLE_TIMEOUT_S,
    )
    assert result.returncode == 0, f"the example at {example.name} failed:\n{result.stderr[-6000:]}"


def test_markers_chain_and_skip_examples(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```python\nx = 1\n```\n\n<!-- example: continues -->\n```python\nassert x == 1\n```\n\n"
        "<!-- example: needs cuda -->\n```python\ntorch.ones(1, device='cuda')\n```\n\n```bash\nls\n```\n"
    )
    first, second = examples([page])
    assert [b.source for b in first.blocks] == ["x = 1", "assert x == 1"] and first.skip_reason is None
    assert second.skip_reason == "page.md:14 needs cuda"
    page.write_text("<!-- example: needs -->\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="unknown example marker"):
        examples([page])


def test_every_page_has_its_examples_found():
    # The parser itself: blocks in other languages are not examples, and no page hides a python block from it.
    for page in PAGES:
        text = page.read_text()
        assert len(python_blocks(page)) == len(re.findall(r"^```(?:python|py)\s*$", text, re.M)), page


# --- the README's commands and links --------------------------------------------------------------------


def marked_command(name: str) -> str:
    """What .ci/run reads between ``<!-- name -->`` and ``<!-- /name -->``: the lines that are neither markers
    nor fences."""
    text = (ROOT / "README.md").read_text()
    section = re.search(rf"^<!-- {name} -->$(.*?)^<!-- /{name} -->$", text, re.M | re.S)
    assert section is not None, f"README.md lost its <!-- {name} --> markers"
    return "\n".join(line for line in section.group(1).strip().splitlines() if not line.startswith(("<!--", "```")))


def test_readme_keeps_the_setup_and_test_commands():
    assert marked_command("main-command") == "python3 -m pip install -e . && graphhal bench"
    assert marked_command("test-command") == "python3 -m pip install -e '.[test]' && python3 -m pytest"


def test_readme_links_every_docs_page_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README.md does not link {page.relative_to(ROOT)}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


# --- the names the pages cite ---------------------------------------------------------------------------

# Names the pages cite from other projects (torch, torch_npu, vLLM, transformers), or that are no code of ours.
# Anything else written like a name of ours must be one.
NOT_OURS = {
    "ExternalEvent", "StaticCache", "ValueError", "TypeError", "aot_compile", "load_cache_artifacts",  # torch
    "AttentionCGSupport", "AutoModelForCausalLM", "generation_config", "eos_token_id", "batched_mm",  # vLLM, transformers
    "AttentionInterface", "emulate_precision_casts", "PromptLookupCandidateGenerator",  # transformers, Inductor
    "auto_dispatch_capture", "npu_fused_infer_attention_score", "npu_fused_infer_attention_score_v2",  # torch_npu
    "npu_multi_head_latent_attention", "actual_seq_kvlen", "capture_end", "BSH", "TND", "BNSD", "NPUGraph",
    "full_graph_fia", "libascendcl", "libopapi", "set_env",  # vllm-ascend, CANN
    "npu_smoke",  # the log scripts/npu_smoke.sh writes
    "base_model_tp_plan", "colwise_gather_output", "rowwise_split_input",  # transformers' tensor-parallel plans
}


@cache
def names_in_our_code() -> frozenset[str]:
    """Every class, function, method, parameter, attribute, keyword and module name defined in our packages."""
    names: set[str] = set()
    for package in OUR_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            names.add(path.stem)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(node.name)
                elif isinstance(node, ast.arg):
                    names.add(node.arg)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)  # module, class (enum members, dataclass fields) and local names
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)  # self.x = ...
                elif isinstance(node, ast.keyword) and node.arg:
                    names.add(node.arg)
    return frozenset(names)


@cache
def our_flags() -> frozenset[str]:
    """Every command-line flag of ``graphhal`` (each subcommand), of ``GraphConfig`` and of the test suite."""
    import argparse

    from graphhal.cli import bench, demo, info
    from runners import GraphConfig

    parsers = [argparse.ArgumentParser(add_help=True) for _ in range(4)]
    for parser, add in zip(parsers, (bench.add_arguments, demo.add_arguments, info.add_arguments, GraphConfig.add_arguments)):
        add(parser)
    flags = {flag for parser in parsers for action in parser._actions for flag in action.option_strings}
    flags |= set(re.findall(r"addoption\(\s*\"(--[\w-]+)\"", (ROOT / "conftest.py").read_text()))
    return frozenset(flags)


@cache
def our_namespace() -> dict[str, object]:
    """What the pages call names by: the public names of hal, runners and graphhal's rooms, and the two packages."""
    import hal
    import runners

    namespace: dict[str, object] = {"hal": hal, "runners": runners}
    for module_name in ("runners", "hal", "graphhal.paged_attention", "graphhal.refmodel"):
        module = importlib.import_module(module_name)
        namespace.update({name: getattr(module, name) for name in module.__all__})
    return namespace


def resolve_dotted(name: str) -> object:
    """Import the longest module prefix of ``name`` and get the rest as attributes (None for an instance
    attribute written on its class); ImportError or AttributeError when something is missing."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            value = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise  # the module exists, and an import inside it failed
            continue
        return resolve_attributes(value, parts[split:])
    raise ImportError(f"no module {parts[0]!r}")


def resolve_attributes(value: object, attributes: list[str]) -> object:
    for attribute in attributes:
        if not hasattr(value, attribute) and isinstance(value, type) and attribute in names_in_our_code():
            return None  # set on instances (self.x = ... in __init__)
        value = getattr(value, attribute)
    return value


def code_spans(page: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline code span outside fenced blocks, and of every line inside a bash block
    (commands: their flags are checked)."""
    spans, fence = [], None
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if match := FENCE.match(line):
            fence = None if fence is not None else match.group(1)
            continue
        if fence is None:
            spans += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
        elif fence == "bash":
            spans.append((number, line.split("#")[0].strip()))
    return spans


IDENTIFIER = r"[A-Za-z_]\w*"
DOTTED_OURS = re.compile(rf"^(?:{'|'.join(OUR_PACKAGES)})(?:\.{IDENTIFIER})+$")
PATH = re.compile(r"^(?:hal|runners|graphhal|devices|tests|docs|\.ci)/[\w./*-]*$|^(?:pyproject\.toml|conftest\.py)$")
OP = re.compile(rf"^(graphhal|refmodel)::({IDENTIFIER})$")
CAMEL = re.compile(rf"^[A-Z]\w*[a-z]\w*(?:\.{IDENTIFIER})*$")  # a class, maybe with attributes: GraphMode.AUTO
SNAKE = re.compile(rf"^(?:{IDENTIFIER}\.)*([a-z]\w*_\w*)(?:\(\))?$")  # a function, field or method: run_bench()
KEYWORD = re.compile(rf"^({IDENTIFIER})=")  # a field set: eager_fallback=False
ON_OBJECT = re.compile(rf"^(runner|report|device|loop)\.({IDENTIFIER})(?:\(\))?$")  # runner.mode_reason


# The objects the pages' prose calls by a variable name (runner.mode_reason, cache.key_caches[i]).
OBJECTS = {"runner", "report", "device", "loop", "model", "cache", "config", "param", "prefill", "decode"}


@cache
def our_source_text() -> str:
    return "\n".join(path.read_text() for package in OUR_PACKAGES for path in (ROOT / package).rglob("*.py")) + (
        ROOT / "conftest.py"
    ).read_text()


def problem_with(span: str) -> str | None:
    """Why ``span`` names something graphhal does not have; None when it exists, or names nothing of ours."""
    import hal

    text = span.strip()
    parts = text.removesuffix("()").split(".")
    if text == hal.ENTRY_POINT_GROUP or parts[0] in NOT_OURS | {"torch"} or parts[-1] in NOT_OURS:
        return None
    if match := re.match(r"^([A-Z][A-Z0-9_]+)=", text):  # an environment variable
        return None if match.group(1) in our_source_text() else f"no environment variable {match.group(1)} is read"
    root = re.match(r"^([a-z_]\w*)\.[a-z_]", text)
    if root and root.group(1) not in OUR_PACKAGES + tuple(OBJECTS) and importlib.util.find_spec(root.group(1)) is None:
        return f"{root.group(1)} is neither a module nor an object the pages name (a module that moved?)"
    if PATH.match(text):
        found = glob.glob(str(ROOT / text)) if "*" in text else (ROOT / text.rstrip("/")).exists()
        return None if found else f"no file or folder {text}"
    if text.startswith("--") or text.startswith(("graphhal ", "python3 -m pytest")):
        unknown = [flag for flag in re.findall(r"(?<!\S)--[\w-]+", text) if flag not in our_flags()]
        return f"no flag {', '.join(unknown)}" if unknown else None
    if re.fullmatch(rf"hal_{IDENTIFIER}", text):
        from hal import hookspecs

        return None if hasattr(hookspecs, text) else f"no hook {text} in hal/hookspecs.py"
    if match := OP.match(text):
        import torch

        importlib.import_module("graphhal.paged_attention" if match.group(1) == "graphhal" else "graphhal.refmodel")
        return None if hasattr(getattr(torch.ops, match.group(1)), match.group(2)) else f"no op {text}"
    if match := KEYWORD.match(text):
        return None if match.group(1) in names_in_our_code() else f"no field or parameter {match.group(1)}"
    try:
        expression = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None  # prose in code marks: a value, a shell command
    if isinstance(expression, ast.Call):
        return _call_problem(text, expression)
    name = text.removesuffix("()")
    if DOTTED_OURS.match(name):
        try:
            resolve_dotted(name)
        except (ImportError, AttributeError) as exc:
            return f"{name} does not resolve ({type(exc).__name__}: {exc})"
        return None
    if CAMEL.match(name):
        root, *attributes = name.split(".")
        if root in our_namespace():
            try:
                resolve_attributes(our_namespace()[root], attributes)
            except AttributeError as exc:
                return f"{name} does not resolve ({exc})"
            return None
        return None if root in names_in_our_code() else f"{root} is defined nowhere in {', '.join(OUR_PACKAGES)}"
    if re.fullmatch(r"[A-Z][A-Z0-9_]+", text):  # a constant or an enum member: GraphSupport.NEVER written NEVER
        return None if text in names_in_our_code() else f"{text} is defined nowhere in {', '.join(OUR_PACKAGES)}"
    if (match := ON_OBJECT.match(text)) or (match := SNAKE.match(text)):
        defined = match.group(match.lastindex) in names_in_our_code()
        return None if defined else f"{match.group(match.lastindex)} is defined nowhere in {', '.join(OUR_PACKAGES)}"
    return None


def _call_problem(text: str, call: ast.Call) -> str | None:
    """A call (``DecodeConfig(max_bs=64)``): what it calls must exist and take the keywords written."""
    callee = ast.unparse(call.func)
    root, *attributes = callee.split(".")
    try:
        if root in our_namespace():
            target = resolve_attributes(our_namespace()[root], attributes)
        elif DOTTED_OURS.match(callee):
            target = resolve_dotted(callee)
        else:  # a method on an object of the page's (runner.can_run(rows)), or another project's call
            name = callee.split(".")[-1]
            ours = name in names_in_our_code() or root in ("torch", "model") or name in NOT_OURS
            return None if ours else f"{name} (called in `{text}`) is defined nowhere in {', '.join(OUR_PACKAGES)}"
    except (ImportError, AttributeError) as exc:
        return f"{callee} does not resolve ({type(exc).__name__}: {exc})"
    if target is None:
        return None
    try:
        inspect.signature(target).bind_partial(**{k.arg: None for k in call.keywords if k.arg})
    except TypeError as exc:
        return f"`{text}`: {exc}"
    except ValueError:
        return None  # no signature to read (a builtin)
    return None


@pytest.mark.cpu
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_name_a_page_cites_exists(page: Path) -> None:
    problems = [
        f"{page.relative_to(ROOT)}:{line}: `{span}`: {problem}"
        for line, span in code_spans(page)
        if (problem := problem_with(span)) is not None
    ]
    assert not problems, "names in the docs that the code does not have:\n" + "\n".join(problems)


def test_the_name_check_catches_what_no_longer_exists():
    assert problem_with("hal.graph_support.OpNotCapturableError") is None
    assert problem_with("hal.graph_support.OpNotCaptureableError") is not None  # a misspelled class
    assert problem_with("refmodel.decode_input_slots") is not None  # a room that moved
    assert problem_with("runners/bucketed_runner.py") is None and problem_with("runners/runner.py") is not None
    assert problem_with("hal_captures_compiled_kernels") is not None  # a hook folded into another
    assert problem_with("graphhal::decode_attention") is None and problem_with("refmodel::decode_attention") is not None
    assert problem_with("DecodeConfig(check_addresses=\"first_replay\")") is None
    assert problem_with("DecodeConfig(check_address=\"first_replay\")") is not None  # a field misspelled
    assert problem_with("RankRunError") is None and problem_with("RankFailedError") is not None
    assert problem_with("runner.claim_current_thread()") is None and problem_with("runner.claim_thread()") is not None
    assert problem_with("pool_budget_mib") is None and problem_with("pool_budget_mb") is not None
    assert problem_with("graphhal bench --tp 2") is None and problem_with("graphhal bench --tensor-parallel 2") is not None


def test_the_device_plugin_page_names_every_hook():
    from hal import hookspecs

    page = (ROOT / "docs" / "device-plugins.md").read_text()
    missing = [name for name in dir(hookspecs) if name.startswith("hal_") and f"`{name}`" not in page]
    assert not missing, f"docs/device-plugins.md does not describe the hooks {', '.join(missing)}"
