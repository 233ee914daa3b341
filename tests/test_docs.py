"""The documentation: a strict build, every public name documented, every example executed.

- `mkdocs build --strict` must pass: a broken link, anchor or API reference fails it, and so
  does a results directory without its command, machine or date (`docs/hooks/results.py`).
- Every public name of `pdeformer`, `pdeformer.data`, `pdeformer.training`,
  `pdeformer.diagnostics` and `pdeformer.cli` has a docstring and a heading in the built API
  reference, and every API page shows an example.
- Every fenced `python` block of the how-to guides, the API, theory and top-level pages and
  the README is executed, page by page, in a fresh namespace and a fresh working directory
  (settings: `_example_config`); the API pages in `SLOW_PAGES` run with `-m slow`. A block
  is skipped only when the line right before its fence is `<!-- docs-test: skip -->`; a page
  that needs files on disk (official LRA data) gets a tiny fixture in the official format
  from `PAGE_FIXTURES` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARKER = "<!-- docs-test: skip -->"
EXECUTED = ("howto/*.md", "api/*.md", "theory/*.md", "*.md")

# ---------------------------------------------------------------------------------------
# (a) the strict build
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
    proc = subprocess.run(
        [*cmd, "-d", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    if proc.returncode != 0:
        log = "\n".join(
            line
            for line in (proc.stdout + proc.stderr).splitlines()
            if "WARNING" in line or "ERROR" in line
        )
        pytest.fail(f"`mkdocs build --strict` failed:\n{log or proc.stderr[-4000:]}")
    return out


def test_strict_build(site):
    assert (site / "index.html").is_file()
    assert (site / "results" / "index.html").is_file()
    assert (site / "api" / "field" / "index.html").is_file()


# ---------------------------------------------------------------------------------------
# (b) every public name documented
# ---------------------------------------------------------------------------------------


@functools.cache
def _package():
    """The package as griffe (and so mkdocstrings) reads it: from the source, statically."""
    import griffe

    return griffe.load("pdeformer", search_paths=[str(ROOT / "src")])


def _own_public(module: types.ModuleType) -> list[str]:
    """Names a module defines itself (functions, classes, constants), not imports."""
    loaded = _package()[module.__name__.removeprefix("pdeformer.")]
    return sorted(
        name
        for name, member in loaded.members.items()
        if not name.startswith("_") and not member.is_alias and not member.is_module
    )


def public_names() -> list[str]:
    import pdeformer
    import pdeformer.cli
    import pdeformer.data
    import pdeformer.diagnostics
    import pdeformer.training

    names = [
        f"pdeformer.{n}"
        for n in dir(pdeformer)
        if not n.startswith("_") and not isinstance(getattr(pdeformer, n), types.ModuleType)
    ]
    for module in (pdeformer.data, pdeformer.training):
        names += [f"{module.__name__}.{n}" for n in module.__all__]
    for module in (pdeformer.diagnostics, pdeformer.cli):
        names += [f"{module.__name__}.{n}" for n in _own_public(module)]
    return sorted(names)


def test_public_names_have_docstrings():
    package = _package()
    missing = []
    for name in public_names():
        obj = package[name.removeprefix("pdeformer.")]
        docstring = obj.docstring
        if docstring is None or not docstring.value.strip():
            missing.append(name)
    assert not missing, (
        "public names without a docstring (add one in the source, as the style guide says: "
        f"a one-line summary, then **Arguments:** / **Returns:**): {missing}"
    )


def test_public_names_in_api_reference(site):
    anchors = set()
    for page in (site / "api").rglob("*.html"):
        anchors.update(re.findall(r'id="(pdeformer[\w.]*)"', page.read_text(encoding="utf-8")))
    missing = [name for name in public_names() if name not in anchors]
    assert not missing, (
        "public names missing from the API reference: add a `::: <name>` line to the "
        f"right page of docs/api/: {missing}"
    )


def test_api_pages_show_examples():
    for page in sorted((DOCS / "api").glob("*.md")):
        if page.name == "index.md":
            continue
        blocks = [b for b in code_blocks(page) if b.lang == "python"]
        assert blocks, f"{page.relative_to(ROOT)} shows no Python example."


# ---------------------------------------------------------------------------------------
# (c) every example executed
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the first code line in the page
    skip: bool


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the skip marker read off."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        previous = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
        j = i + 1
        while j < len(lines) and not (
            lines[j].startswith(indent) and lines[j].strip().startswith(fence)
        ):
            j += 1
        body = textwrap.dedent("\n".join(lines[i + 1 : j]))
        blocks.append(Block(lang, body, i + 2, previous == SKIP_MARKER))
        i = j + 1
    return blocks


def _write_lra_fixture(cwd: Path) -> None:
    """A tiny official-format LRA release: `lra_release/listops-1000/basic_*.tsv`."""
    from pdeformer.data import ListOpsConfig, generate_listops, write_listops_tsv

    root = cwd / "lra_release" / "listops-1000"
    root.mkdir(parents=True)
    config = ListOpsConfig(max_depth=3, min_length=5, max_length=40)
    seen: set[bytes] = set()
    for k, (split, n) in enumerate((("train", 48), ("val", 16), ("test", 16))):
        rows = generate_listops(n, config, seed=k, exclude=seen)
        write_listops_tsv(root / f"basic_{split}.tsv", rows)


PAGE_FIXTURES: dict[str, Callable[[Path], None]] = {"howto/lra.md": _write_lra_fixture}


@contextlib.contextmanager
def _example_config():
    """Run examples as a user would, with the suite's annotation checks and errors on warnings.

    The package's jaxtyping annotations stay checked by beartype (the suite's import hook).
    Dtype promotion is JAX's default, "standard": the suite's "strict" setting hardens the
    library, but a user's own code (an optax optimiser, say) runs under the default. XLA's
    optimisations are off, because compiling these tiny examples dominates their run time on a
    CPU. Whatever a page changes in JAX's configuration is undone afterwards.
    """
    import jax

    before = dict(jax.config.values)
    try:
        jax.config.update("jax_disable_most_optimizations", True)
        with jax.numpy_dtype_promotion("standard"):
            yield
    finally:
        for name, value in before.items():
            if jax.config.values.get(name) != value:
                jax.config.update(name, value)


# API pages whose examples compile solves: run with the slow tests (`-m slow`), to keep the
# default run short. The how-to guides and the README always run.
SLOW_PAGES = frozenset({"api/diffusion.md", "api/integrators.md", "api/models.md", "api/stiff.md"})


def _pages() -> list:
    pages = sorted({str(p.relative_to(DOCS)) for pat in EXECUTED for p in DOCS.glob(pat)})
    pages = [p for p in pages if any(b.lang == "python" for b in code_blocks(DOCS / p))]
    return [
        pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p
        for p in [*pages, "README.md"]
    ]


@pytest.mark.parametrize("page", _pages())
def test_examples_run(page, tmp_path, monkeypatch):
    path = ROOT / page if page == "README.md" else DOCS / page
    blocks = [b for b in code_blocks(path) if b.lang == "python" and not b.skip]
    assert blocks, f"{page}: no executable Python block"
    monkeypatch.chdir(tmp_path)
    if page in PAGE_FIXTURES:
        PAGE_FIXTURES[page](tmp_path)
    namespace: dict = {"__name__": "__main__"}
    with _example_config():
        for block in blocks:
            # Padding keeps the traceback's line numbers those of the Markdown file.
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, str(path), "exec"), namespace)


# ---------------------------------------------------------------------------------------
# the results hook, on a results directory of its own
# ---------------------------------------------------------------------------------------


def _results_hook():
    spec = importlib.util.spec_from_file_location("results_hook", DOCS / "hooks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_results_hook_pages(tmp_path):
    hook = _results_hook()
    exp = tmp_path / "results" / "sweep"
    exp.mkdir(parents=True)
    (exp / "results.md").write_text(
        "# A sweep\n\n- date: 2026-01-01\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![p](plot.png)\n"
    )
    (exp / "results.json").write_text(
        '{"meta": {"command": "python experiments/sweep.py", "date": "2025-12-31", '
        '"machine": {"cpu": "X", "cpu_count": 2, "devices": ["cpu:0"]}}}'
    )
    (exp / "plot.png").write_bytes(b"")
    (exp / "extra.svg").write_bytes(b"")
    (tmp_path / "results" / "bare").mkdir()
    (tmp_path / "results" / "bare" / "results.md").write_text("no title, no metadata\n")

    found = hook.collect(tmp_path)
    assert [e.name for e in found] == ["bare", "sweep"]
    bare, sweep = found
    assert sweep.title == "A sweep" and sweep.page == "results/sweep/index.md"
    # The experiment's own line wins over the JSON; the machine is summarised.
    assert sweep.meta == {
        "command": "python experiments/sweep.py",
        "date": "2026-01-01",
        "machine": "X (2 CPUs), devices cpu:0",
    }
    assert sweep.figures == ("extra.svg",)  # plot.png is shown by the body already
    assert sweep.raw == ("results.json",)
    page = hook.render(sweep)
    assert page.startswith("# A sweep\n")
    assert "- command: `python experiments/sweep.py`" in page and "![extra.svg](extra.svg)" in page
    assert "| 1 | 2 |" in page and "[results.json](results.json)" in page
    assert bare.meta == {} and "**not recorded**" in hook.render(bare)

    index = hook.render_index(found)
    assert "| [A sweep](sweep/index.md) | 2026-01-01 | X (2 CPUs), devices cpu:0 |" in index
    assert "No experiment outputs" in hook.render_index([])

    nav = [{"Home": "index.md"}, {"Results": "results/index.md"}]
    assert hook._expand_nav(nav, "results/index.md", [{"A sweep": sweep.page}])
    assert nav[1] == {"Results": ["results/index.md", {"A sweep": "results/sweep/index.md"}]}


def test_results_hook_warns_without_provenance(tmp_path, caplog):
    # Under `mkdocs build --strict` these warnings fail the build.
    hook = _results_hook()
    exp = tmp_path / "results" / "bare"
    exp.mkdir(parents=True)
    (exp / "results.md").write_text("# Bare\n\n- command: `python x.py`\n")
    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.results"):
        hook.on_config({"docs_dir": str(tmp_path), "nav": None})
    text = caplog.text
    assert "no machine recorded" in text and "no date recorded" in text
    assert "no command recorded" not in text


def test_results_hook_cites_committed_results():
    hook = _results_hook()
    body = (
        "# Sweep\n\n- date: d\n- machine: m\n\n## Summary\n\nIt held; see ![p](p.png).\n\n## Next\n"
    )
    exp = hook.Experiment(
        "sweep", "docs/results/sweep/", "results/sweep/index.md", "Sweep",
        {"date": "d", "machine": "m"}, body, (), (), (),
    )  # fmt: skip
    assert hook.section(body, "Summary") == "It held; see ![p](p.png)."
    page = "x\n<!-- results: sweep#Summary -->\n<!-- results: sweep -->\n<!-- results: gone -->\n"
    out = hook.cite(page, "theory/papers.md", [exp])
    assert "From [Sweep](../results/sweep/index.md) (d, m):" in out
    assert "It held; see ![p](../results/sweep/p.png)." in out  # links follow the quote
    assert "\n[Sweep](../results/sweep/index.md) (d, m)\n" in out
    assert "*No result of `gone` is committed yet.*" in out
    # Only a marker alone on its line is replaced (not one quoted in prose).
    assert hook.cite("`<!-- results: sweep -->`", "index.md", [exp]).startswith("`<!--")
