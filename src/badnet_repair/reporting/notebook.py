"""Notebook support: display helpers, headless execution and self-contained HTML reports.

The notebook ``Homework-2.ipynb`` stays thin: it calls these and the rest of the package.
``execute_notebook`` runs a notebook in a real Jupyter kernel (nbclient) with its
``parameters`` cell overridden (as papermill does) and writes the executed notebook and a
self-contained HTML with every image embedded.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..formats.data import Dataset
from ..formats.files import atomic_path, write_text
from ..progress import ENV as PROGRESS_ENV

__all__ = [
    "execute_notebook",
    "figure_png",
    "finish_streams",
    "markdown_to_html",
    "read_conclusion",
    "sample_grid",
    "show",
    "write_html_report",
]


def figure_png(fig: Any, *, dpi: int = 100) -> bytes:
    """The PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig: Any, *, dpi: int = 80) -> Any:
    """Display a matplotlib figure in Jupyter as a PNG (works in headless runs too).

    Returns:
        An ``IPython.display.Image``; the last expression of a cell is displayed.
    """
    from IPython.display import Image

    return Image(data=figure_png(fig, dpi=dpi), format="png")


def sample_grid(clean: Dataset, poisoned: Dataset | None = None, *, n: int = 5,
                predictions: Mapping[str, np.ndarray] | None = None) -> Any:
    """A figure of the first ``n`` clean and ``n`` poisoned images with their labels.

    Args:
        clean: clean images.
        poisoned: poisoned images (labelled with the target), optional.
        n: images per row, default 5.
        predictions: optional ``{"clean": (n,), "poisoned": (n,)}`` predicted classes to show.

    Returns:
        The matplotlib Figure.
    """
    from .plotting import plot_samples

    rows = [("clean", clean)] + ([("poisoned", poisoned)] if poisoned is not None else [])
    images, captions = [], []
    for kind, ds in rows:
        k = min(n, len(ds))
        images.append(ds.x[:k])
        for i in range(k):
            cap = f"{kind} label {int(ds.y[i])}"
            if predictions and kind in predictions:
                cap += f"\nB says {int(predictions[kind][i])}"
            captions.append(cap)
        images.append(np.zeros((n - k, *ds.x.shape[1:]), np.float32))
        captions += [""] * (n - k)
    return plot_samples(np.concatenate(images), captions, ncols=n)


def _embed_images(html: str, base: Path) -> str:
    def repl(m: re.Match[str]) -> str:
        src = m.group(2)
        if src.startswith(("data:", "http://", "https://")):
            return m.group(0)
        p = (base / src).resolve()
        if not p.is_file():
            return m.group(0)
        mime = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        data = base64.b64encode(p.read_bytes()).decode()
        return f'{m.group(1)}data:{mime};base64,{data}{m.group(3)}'

    return re.sub(r'(<img[^>]*?src=")([^"]+)(")', repl, html)


def markdown_to_html(markdown: str, *, base: str | os.PathLike[str] = ".", title: str = "Report") -> str:
    """A self-contained HTML page of a markdown text; local images are embedded as data URIs."""
    import mistune

    body = mistune.create_markdown(plugins=["table"])(markdown)
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;"
             "line-height:1.45}table{border-collapse:collapse}td,th{border:1px solid #bbb;"
             "padding:.25em .6em}th{background:#f0f0f0}img{max-width:100%}code{background:#f4f4f4}")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")
    return _embed_images(page, Path(base))


def write_html_report(report_md: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                      *, overwrite: bool = True) -> Path:
    """Render ``Lab2_report.md`` to a self-contained ``Lab2_report.html`` beside it (or ``out``)."""
    md = Path(report_md)
    target = Path(out) if out is not None else md.with_suffix(".html")
    html = markdown_to_html(md.read_text(encoding="utf-8"), base=md.parent, title=md.stem)
    return write_text(target, html, overwrite=overwrite)


def _inject_parameters(nb: Any, parameters: Mapping[str, Any]) -> None:
    import nbformat

    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])),
               None)
    if idx is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    lines = ["# Parameters injected by badnet_repair.reporting.notebook.execute_notebook"]
    lines += [f"{k} = {v!r}" for k, v in parameters.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)


def execute_notebook(
    notebook: str | os.PathLike[str],
    *,
    parameters: Mapping[str, Any] | None = None,
    output: str | os.PathLike[str] | None = None,
    html: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: int = 1800,
    kernel_name: str = "python3",
) -> Any:
    """Run a notebook top to bottom in a Jupyter kernel, headless.

    Args:
        notebook: the ``.ipynb`` file.
        parameters: values that override the ``parameters``-tagged cell (a cell assigning
            them is inserted after it).
        output: where to write the executed notebook, optional.
        html: where to write a self-contained HTML of the executed notebook, optional.
        cwd: the kernel's working folder, default the notebook's folder.
        timeout: seconds allowed per cell, default 1800.
        kernel_name: the Jupyter kernel, default ``python3``.

    Returns:
        The executed ``nbformat`` notebook.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (the message shows which).
    """
    import nbformat
    from nbclient import NotebookClient

    src = Path(notebook)
    nb = nbformat.read(src, as_version=4)
    if parameters:
        _inject_parameters(nb, parameters)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(cwd or src.parent)}})
    # text progress bars that stay: a saved notebook keeps no widget state, so a widget bar
    # would show as frozen at 0%
    client.execute(env={**os.environ, PROGRESS_ENV: "text"})
    finish_streams(nb)
    if output is not None:
        with atomic_path(output, overwrite=True) as tmp:
            nbformat.write(nb, tmp)
    if html is not None:
        from nbconvert import HTMLExporter

        exporter = HTMLExporter(embed_images=True)
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"path": str(cwd or src.parent)}})
        write_text(html, body, overwrite=True)
    return nb


def finish_streams(nb: Any) -> None:
    """Merge each cell's consecutive stream outputs and apply carriage returns, in place, as a
    terminal shows them: a progress bar redrawn with ``\\r`` keeps only its last state."""
    for cell in nb.cells:
        merged: list[Any] = []
        for o in cell.get("outputs", []):
            if (o.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                    and merged[-1].get("name") == o.get("name")):
                merged[-1]["text"] += o["text"]
            else:
                merged.append(o)
        for o in merged:
            if o.get("output_type") == "stream":
                o["text"] = "\n".join(_last_redraw(line) for line in o["text"].split("\n"))
        if "outputs" in cell:
            cell["outputs"] = merged


def _last_redraw(line: str) -> str:
    parts = [p for p in line.split("\r") if p]
    return parts[-1] if parts else ""


def notebook_outputs(nb: Any, kind: str = "text/markdown") -> list[str]:
    """Every output of the given MIME type in an executed notebook, in order."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if kind in data:
                v = data[kind]
                out.append(v if isinstance(v, str) else json.dumps(v))
    return out


def markdown_rows(table: str) -> list[list[str]]:
    """The body rows of a markdown table, as lists of stripped cell texts."""
    rows = [r.strip() for r in table.strip().splitlines() if r.strip().startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def parameter_names(notebook: str | os.PathLike[str]) -> Sequence[str]:
    """Names assigned in a notebook's ``parameters`` cell."""
    import ast

    import nbformat

    nb = nbformat.read(Path(notebook), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)]


#: The tag of the notebook's markdown cell where the student writes the conclusion.
CONCLUSION_TAG = "conclusion"

#: A line of the conclusion cell that only asks for the student's text (not part of it).
CONCLUSION_PROMPT = "*Replace this line with your conclusion"


def read_conclusion(notebook: str | os.PathLike[str], *, tag: str = CONCLUSION_TAG) -> str | None:
    """The student's conclusion: the text of the notebook's markdown cell tagged ``tag``, as saved.

    The cell's headings and the line that asks for the text (:data:`CONCLUSION_PROMPT`) are
    not part of the conclusion.

    Args:
        notebook: the ``.ipynb`` file, as last saved.
        tag: the cell's tag, default ``"conclusion"``.

    Returns:
        The conclusion's markdown, or None where the notebook has no such cell, the file is
        absent, or the student has not written anything yet.
    """
    import nbformat

    path = Path(notebook)
    if not path.is_file():
        return None
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown" and tag in cell.get("metadata", {}).get("tags", []):
            lines = [ln for ln in cell.source.splitlines()
                     if not ln.lstrip().startswith("#") and not ln.strip().startswith(CONCLUSION_PROMPT)]
            text = "\n".join(lines).strip()
            return text or None
    return None
