"""Small HTML helpers of the reports: escaping, tables, relative links, the style sheet."""

from __future__ import annotations

import html
import math
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

#: The page template of the subject reports (its style sheet serves the group report too).
TEMPLATE_FILE = "report.tpl"


def escape(value: Any) -> str:
    """Text as HTML (quotes too)."""
    return html.escape(str(value), quote=True)


def table(rows: list[tuple[Any, ...]], header: tuple[str, ...] | None = None, cls: str = "iqt-table") -> str:
    """An HTML table; cells are escaped unless given as :class:`Raw`."""

    def cell(v: Any, tag: str) -> str:
        return f"<{tag}>{v.text if isinstance(v, Raw) else escape(v)}</{tag}>"

    head = "<thead><tr>" + "".join(cell(h, "th") for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


class Raw:
    """HTML that goes into a table cell as it is."""

    def __init__(self, text: str):
        self.text = text


def relpath(path: Path, output_dir: Path) -> str:
    """``path`` relative to the output folder, with ``/`` (an href of a page at its root)."""
    return Path(os.path.relpath(path, output_dir)).as_posix()


def link(path: Path, output_dir: Path, text: str | None = None) -> Raw:
    rel = relpath(path, output_dir)
    return Raw(f'<a href="{escape(rel)}">{escape(text or path.name)}</a>')


def data_file(name: str) -> Path:
    """A file of ``iqt_pipe/data``."""
    return Path(str(files("iqt_pipe.data").joinpath(name)))


def to_float(text: str | None) -> float | None:
    """A TSV cell as a finite number, else None."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def style_sheet() -> str:
    """The subject reports' style sheet (from the template), shared by the group report."""
    return data_file(TEMPLATE_FILE).read_text().split("<style>", 1)[1].split("</style>", 1)[0]
