"""mkdocs hook: one page per committed experiment output under `docs/results/`, and an index.

An experiment commits its outputs to `docs/results/<name>/`:

- `results.md`: its tables in Markdown, starting with a `# Title`; it may show figures of the
  same directory (`![...](pareto.png)`);
- `results.json` (optional) whose `meta` object holds `command`, `date` and `machine`;
- figures (`*.png`, `*.svg`, `*.jpg`) and any other raw outputs.

At build time this hook replaces `results.md` with a page `results/<name>/index.md` that
states the command, machine and date (from `- command:`/`- date:`/`- machine:` lines of
`results.md`, else from `results.json`), then shows `results.md`, then every figure that
`results.md` does not show already, then links to the raw files. It also writes
`results/index.md`, a table of all experiments, and expands the `Results` entry of the nav.
A Markdown file directly in `docs/results/` (other than `index.md`) is an experiment page
too, with its metadata from its own lines or from a `.json` file of the same stem.

Other pages cite results with a marker that the hook resolves at build time, so that no
number is copied by hand and no link dangles before the result is committed:

- `<!-- results: NAME -->` becomes a link to the experiment's page with its date and
  machine, or a line saying that no result of `NAME` is committed yet;
- `<!-- results: NAME#Heading -->` also quotes the section `## Heading` of its `results.md`.

A missing command, machine or date is logged as a warning, so the strict build fails: every
result must say how, where and when it was made. Nothing is hard-coded: add a directory and
rebuild.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.results")

RESULTS = "results"
PROVENANCE = ("command", "machine", "date")
FIGURES = (".png", ".svg", ".jpg", ".jpeg")
_META_LINE = re.compile(r"^\s*[-*]\s*\**(command|machine|date)\**\s*:\s*(.+?)\s*$", re.I)
_TITLE = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.M)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment's committed outputs."""

    name: str
    origin: str  # the committed directory or file, relative to the repository root
    page: str  # the generated page, relative to docs_dir (POSIX)
    title: str
    meta: dict[str, str]  # command, machine, date: those that were found
    body: str  # the experiment's own Markdown, or ""
    sources: tuple[str, ...]  # Markdown files the page replaces, relative to docs_dir
    figures: tuple[str, ...]  # figure file names not shown by the body
    raw: tuple[str, ...]  # other files, linked from the page


def _format_machine(machine: Any) -> str:
    if isinstance(machine, dict):
        parts = []
        if "cpu" in machine:
            cpu = str(machine["cpu"])
            if "cpu_count" in machine:
                cpu += f" ({machine['cpu_count']} CPUs)"
            parts.append(cpu)
        if machine.get("devices"):
            devices = machine["devices"]
            parts.append(
                "devices "
                + (", ".join(map(str, devices)) if isinstance(devices, list) else devices)
            )
        for key in ("gpu", "jax", "python", "platform"):
            if machine.get(key):
                parts.append(f"{key} {machine[key]}")
        known = {"cpu", "cpu_count", "devices", "gpu", "jax", "python", "platform"}
        parts += [f"{k} {v}" for k, v in machine.items() if k not in known and v]
        return ", ".join(parts)
    return str(machine)


def _json_meta(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning(f"{path}: not readable as JSON ({exc}).")
        return {}
    if not isinstance(data, dict):
        return {}
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
    out = {}
    for key in PROVENANCE:
        value = meta.get(key)
        if value not in (None, "", {}, []):
            out[key] = _format_machine(value) if key == "machine" else str(value)
    return out


def _md_meta(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = _META_LINE.match(line)
        if m and m.group(1).lower() not in out:
            out[m.group(1).lower()] = m.group(2).strip("` ")
    return out


def _experiment(name: str, md: Path | None, js: Path | None, files: list[Path]):
    body = md.read_text(encoding="utf-8") if md is not None else ""
    meta = _json_meta(js) if js is not None else {}
    meta.update(_md_meta(body))  # the experiment's own summary lines win
    m = _TITLE.search(body)
    title = m.group(1) if m else name.replace("_", " ").replace("-", " ").capitalize()
    figures = tuple(p.name for p in files if p.suffix.lower() in FIGURES and p.name not in body)
    raw = tuple(p.name for p in files if p.suffix.lower() not in FIGURES + (".md",))
    return title, meta, body, figures, raw


def collect(docs_dir: str | Path) -> list[Experiment]:
    """Every experiment under `docs_dir/results/`, sorted by name."""
    root = Path(docs_dir) / RESULTS
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.is_file() and p.name[0] not in "._")
            mds = [p for p in files if p.suffix == ".md"]
            md = entry / "results.md" if (entry / "results.md").is_file() else None
            if md is None and (entry / "index.md").is_file():
                md = entry / "index.md"
            if md is None and len(mds) == 1:
                md = mds[0]
            js = entry / "results.json" if (entry / "results.json").is_file() else None
            if md is None and js is None and not files:
                continue
            page = f"{RESULTS}/{entry.name}/index.md"
            title, meta, body, figures, raw = _experiment(entry.name, md, js, files)
            sources = tuple(f"{RESULTS}/{entry.name}/{p.name}" for p in mds)
            origin = f"docs/{RESULTS}/{entry.name}/"
            found.append(
                Experiment(entry.name, origin, page, title, meta, body, sources, figures, raw)
            )
        elif entry.suffix == ".md" and entry.name != "index.md":
            js = entry.with_suffix(".json")
            page = f"{RESULTS}/{entry.name}"
            title, meta, body, _, _ = _experiment(
                entry.stem, entry, js if js.is_file() else None, []
            )
            origin = f"docs/{page}"
            found.append(Experiment(entry.stem, origin, page, title, meta, body, (page,), (), ()))
    return found


def render(exp: Experiment) -> str:
    """The Markdown of one experiment's page."""
    lines = []
    body = exp.body
    m = _TITLE.search(body)
    if m and not body[: m.start()].strip():
        # Keep the experiment's own title on top, provenance right below it.
        lines.append(body[: m.end()].strip())
        body = body[m.end() :]
    else:
        lines.append(f"# {exp.title}")
    shown = _md_meta(exp.body)
    missing = [k for k in PROVENANCE if k not in shown]
    if missing:
        lines += ["", '!!! info "How this result was made"', ""]
        for key in PROVENANCE:
            value = exp.meta.get(key, "**not recorded**")
            lines.append(f"    - {key}: `{value}`" if key == "command" else f"    - {key}: {value}")
    lines += ["", body.strip()] if body.strip() else []
    if exp.figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({name})" for name in exp.figures]
    if exp.raw:
        lines += ["", "## Raw outputs", ""]
        lines += [f"- [{name}]({name})" for name in exp.raw]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_index(experiments: list[Experiment]) -> str:
    """The Markdown of `results/index.md`."""
    lines = [
        "# Results",
        "",
        "Each page is generated when the site is built, from the outputs an experiment "
        "committed under `docs/results/<name>/` (its `results.md` tables, its figures and the "
        "`meta` of its `results.json`). Nothing here is typed by hand: to publish a result, "
        "run its experiment with `--out docs/results/<name>`, commit that directory and "
        "rebuild.",
        "",
    ]
    if not experiments:
        lines.append("No experiment outputs are committed yet.")
        return "\n".join(lines) + "\n"
    lines += ["| experiment | date | machine | command |", "|---|---|---|---|"]
    for exp in experiments:
        link = f"[{_cell(exp.title)}]({exp.page[len(RESULTS) + 1 :]})"
        date = _cell(exp.meta.get("date", "not recorded"))
        machine = _cell(exp.meta.get("machine", "not recorded"))
        command = exp.meta.get("command")
        command = f"`{_cell(command)}`" if command else "not recorded"
        lines.append(f"| {link} | {date} | {machine} | {command} |")
    return "\n".join(lines) + "\n"


_MARKER = re.compile(r"^[ \t]*<!--\s*results:\s*([\w.-]+)(?:#(.+?))?\s*-->[ \t]*$", re.M)
_RELATIVE_URL = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|/|#)([^)\s]+)")


def section(body: str, heading: str) -> str | None:
    """The text under the heading `heading` (any level), up to the next heading of that level."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.+?)\s*#*\s*$", line)
        if m and m.group(2).strip() == heading.strip():
            level = len(m.group(1))
            end = next(
                (j for j in range(i + 1, len(lines)) if re.match(rf"^#{{1,{level}}}\s", lines[j])),
                len(lines),
            )
            return "\n".join(lines[i + 1 : end]).strip()
    return None


def cite(markdown: str, page_uri: str, experiments: list[Experiment]) -> str:
    """Resolve the `<!-- results: NAME[#Heading] -->` markers of a page (see the module doc)."""
    by_name = {exp.name: exp for exp in experiments}
    here = posixpath.dirname(page_uri)

    def replace(m: re.Match) -> str:
        name, heading = m.group(1), m.group(2)
        exp = by_name.get(name)
        if exp is None:
            return f"*No result of `{name}` is committed yet.*"
        link = posixpath.relpath(exp.page, here or ".")
        when = ", ".join(exp.meta[k] for k in ("date", "machine") if k in exp.meta)
        text = f"[{exp.title}]({link})" + (f" ({when})" if when else "")
        if heading is None:
            return text
        quoted = section(exp.body, heading)
        if quoted is None:
            log.info(f"{exp.origin}: no section {heading!r} to quote in {page_uri}.")
            return text
        base = posixpath.dirname(link)
        quoted = _RELATIVE_URL.sub(lambda u: f"]({posixpath.join(base, u.group(1))}", quoted)
        return f"From {text}:\n\n{quoted}"

    return _MARKER.sub(replace, markdown)


# ---------------------------------------------------------------------------------------
# mkdocs events
# ---------------------------------------------------------------------------------------

_state: dict[str, list[Experiment]] = {}


def _expand_nav(nav: list, index: str, pages: list[dict[str, str]]) -> bool:
    for i, item in enumerate(nav):
        if isinstance(item, dict):
            for title, value in item.items():
                if value == index:
                    item[title] = [index, *pages]
                    return True
                if isinstance(value, list) and _expand_nav(value, index, pages):
                    return True
        elif item == index:
            nav[i : i + 1] = [index, *pages]
            return True
    return False


def on_config(config, **kwargs):
    experiments = collect(config["docs_dir"])
    _state["experiments"] = experiments
    for exp in experiments:
        for key in PROVENANCE:
            if key not in exp.meta:
                log.warning(
                    f"{exp.origin}: no {key} recorded for experiment {exp.name!r}; add a "
                    f"'- {key}: ...' line to its Markdown or '{key}' to the 'meta' of its "
                    "results.json."
                )
    if config["nav"] is not None:
        pages = [{exp.title: exp.page} for exp in experiments]
        _expand_nav(config["nav"], f"{RESULTS}/index.md", pages)
    return config


def on_files(files: Files, config, **kwargs):
    experiments = _state.get("experiments", [])
    for exp in experiments:
        for src in exp.sources:
            old = files.get_file_from_path(src)
            if old is not None:
                files.remove(old)
        files.append(File.generated(config, exp.page, content=render(exp)))
    index = f"{RESULTS}/index.md"
    if files.get_file_from_path(index) is None:
        files.append(File.generated(config, index, content=render_index(experiments)))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    if "<!--" not in markdown:
        return markdown
    return cite(markdown, page.file.src_uri, _state.get("experiments", []))
