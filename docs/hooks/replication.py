"""mkdocs hook: the replication table of the two papers' claims, filled in from the results.

A page that contains the line `<!-- replication -->` gets, in its place, one table row per
claim of `CLAIMS`: the paper's value, what our committed runs measured (with the 95%
interval) and the verdict, `holds`, `does not hold` or `not resolved`. The rows come from
the `replication` lists of the committed `docs/results/<name>/results.json` files, which the
studies write (`experiments/studies/lra_placement.py`, `experiments/studies/stabilizers.py`,
verdicts by `experiments/report.py: claim_verdict` and the criteria written in the scripts).
Each entry is a dict with `id` (a key of `CLAIMS`), `measured` (text), `verdict`, `basis`
(tasks, seeds) and `scale` (`"cpu"` or `"lra"`). A claim that no committed run measures is
shown as not resolved. Nothing is typed by hand: rerun a study with
`--out docs/results/<name>`, commit, rebuild.

The table also says at which scale its runs were made, and that the LRA-scale runs have not
been made while no committed entry has `scale == "lra"`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.replication")

RESULTS = "results"
MARKER = re.compile(r"^[ \t]*<!--\s*replication\s*-->[ \t]*$", re.M)
VERDICTS = ("holds", "does not hold", "not resolved")

CLAIMS: dict[str, tuple[str, str, str]] = {
    "A1": (
        "A",
        "A diffusion layer after the embedding improves accuracy",
        "+4.1 points (LRA average)",
    ),
    "A2": (
        "A",
        "A diffusion layer after the attention lowers accuracy",
        "−2.5 points; worst on every task but Image",
    ),
    "A3": ("A", "Multi-scale diffusion beats single scale", "on every task"),
    "A4": ("A", "After the embedding is the best insertion point", "best of seven"),
    "B1": (
        "B",
        "Without residual connections, representations drift catastrophically",
        "qualitative",
    ),
    "B2": ("B", "Without LayerNorm, training is unstable and explosive", "qualitative"),
}
"""Claim id -> (paper, claim, the paper's value)."""


def collect(results_dir: str | Path) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Claim id -> `(experiment name, entry)` for every `replication` entry of the
    `results.json` files directly under `results_dir`'s subdirectories."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    root = Path(results_dir)
    if not root.is_dir():
        return found
    for path in sorted(root.glob("*/results.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning(f"{path}: not readable as JSON ({exc}).")
            continue
        entries = data.get("replication") if isinstance(data, dict) else None
        for entry in entries or []:
            claim = entry.get("id")
            if claim not in CLAIMS:
                log.warning(f"{path}: unknown claim id {claim!r} in 'replication'.")
                continue
            if entry.get("verdict") not in VERDICTS:
                log.warning(f"{path}: claim {claim} has verdict {entry.get('verdict')!r}.")
                continue
            found.setdefault(claim, []).append((path.parent.name, entry))
    return found


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(results_dir: str | Path, page_uri: str = "index.md") -> str:
    """The replication table's Markdown, with links relative to the page `page_uri`."""
    found = collect(results_dir)
    here = posixpath.dirname(page_uri)
    lines = [
        "| paper | claim | paper's value | measured (95% interval) | verdict | run |",
        "|---|---|---|---|---|---|",
    ]
    scales = set()
    for claim, (paper, text, value) in CLAIMS.items():
        rows = found.get(claim) or [(None, None)]
        for name, entry in rows:
            if entry is None:
                measured, verdict, run = "not measured by a committed run", "not resolved", ""
            else:
                scales.add(entry.get("scale", "cpu"))
                measured = entry.get("measured", "")
                if entry.get("basis"):
                    measured += f" ({entry['basis']})"
                verdict = entry["verdict"]
                link = posixpath.relpath(f"{RESULTS}/{name}/index.md", here or ".")
                run = f"[{name}]({link})"
            lines.append(
                f"| {paper} | {_cell(text)} | {_cell(value)} | {_cell(measured)} | "
                f"**{verdict}** | {run} |"
            )
    lines.append("")
    if "lra" in scales:
        lines.append("Some rows above come from LRA-scale runs; their basis says which.")
    else:
        lines.append(
            "**The LRA-scale runs have not been made.** Every measured row above comes from "
            "CPU-sized models on offline tasks (the basis of each row says which), so a verdict "
            "here says what holds at that scale, not on the Long Range Arena."
        )
    lines.append(
        "*holds*: the 95% interval lies on the claimed side of zero (or of the criterion the "
        "study states), with the multiplicity-corrected p-value at most 0.05 where the study "
        "corrects; *does not hold*: it lies on the other side; *not resolved*: it contains "
        "it, the baseline did not pass the learning gate, or no committed run measures it."
    )
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    if "replication" not in markdown:
        return markdown
    table = render(Path(config["docs_dir"]) / RESULTS, page.file.src_uri)
    return MARKER.sub(lambda _: table, markdown)
