"""The methods text (``logs/CITATION.md``, pandoc-style ``[@key]`` citations) as readable
HTML: citations become "(Tanno et al., 2017)", cited works a reference list from
``logs/CITATION.bib``."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

_ENTRY = re.compile(r"@(\w+)\s*\{\s*([^,\s]+)\s*,")
_FIELD = re.compile(r"\s*,?\s*(\w+)\s*=\s*")
_GROUP = re.compile(r"\[((?:[^\[\]]*?@[\w:.-]+[^\[\]]*?)+)\]")
_KEY = re.compile(r"@([\w:.-]*\w)")


def _braced(text: str, start: int) -> int:
    """Index just past the brace that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("unbalanced braces in the BibTeX file")


def _clean(value: str) -> str:
    value = value.replace("{", "").replace("}", "").replace("---", "—").replace("--", "–")
    return re.sub(r"\s+", " ", value).strip()


def parse_bibtex(text: str) -> dict[str, dict[str, str]]:
    """``{key: {"type": ..., field: value}}`` of the entries of a BibTeX file (braces and
    ``--`` resolved; enough for the bibliography iqt-pipe ships)."""
    entries: dict[str, dict[str, str]] = {}
    for match in _ENTRY.finditer(text):
        end = _braced(text, text.index("{", match.start())) - 1
        body, pos = text[match.end() : end], 0
        fields = {"type": match.group(1).lower()}
        while True:
            m = _FIELD.match(body, pos)
            if not m or m.end() >= len(body):
                break
            pos = m.end()
            if body[pos] == "{":
                close = _braced(body, pos)
                value, pos = body[pos + 1 : close - 1], close
            elif body[pos] == '"':
                close = body.index('"', pos + 1)
                value, pos = body[pos + 1 : close], close + 1
            else:
                bare = re.match(r"[^,\s]+", body[pos:])
                value, pos = bare.group(0), pos + bare.end()
            fields[m.group(1).lower()] = _clean(value)
        entries[match.group(2)] = fields
    return entries


def _surnames(entry: dict[str, str]) -> list[str]:
    authors = [a.strip() for a in entry.get("author", "").split(" and ") if a.strip()]
    return [a.split(",")[0].strip() if "," in a else a.split()[-1] for a in authors]


def cite(entry: dict[str, str] | None, key: str, narrative: bool = False) -> str:
    """ "Tanno et al., 2017" (``narrative``: "Tanno et al. (2017)"); ``?key`` when unknown."""
    if entry is None:
        return f"?{key}"
    names = _surnames(entry)
    who = (
        names[0]
        if len(names) == 1
        else f"{names[0]} and {names[1]}"
        if len(names) == 2
        else f"{names[0]} et al."
        if names
        else key
    )
    year = entry.get("year", "n.d.")
    return f"{who} ({year})" if narrative else f"{who}, {year}"


def reference(entry: dict[str, str]) -> str:
    """One reference as HTML: authors (surname and initials), year, title, venue, DOI link."""
    authors = []
    for author in (a.strip() for a in entry.get("author", "").split(" and ") if a.strip()):
        last, _, first = (
            author.partition(",") if "," in author else (author.split()[-1], "", " ".join(author.split()[:-1]))
        )
        initials = "".join(part[0] for part in re.split(r"[\s.-]+", first.strip()) if part)
        authors.append(f"{last.strip()} {initials}".strip())
    venue = entry.get("journal") or entry.get("booktitle") or entry.get("publisher") or ""
    details = ", ".join(v for v in (entry.get("volume"), entry.get("pages")) if v)
    parts = [
        html.escape(", ".join(authors)) + f" ({html.escape(entry.get('year', 'n.d.'))}).",
        html.escape(entry.get("title", "")) + ".",
    ]
    if venue:
        parts.append(f"<em>{html.escape(venue)}</em>" + (f" {html.escape(details)}" if details else "") + ".")
    if entry.get("doi"):
        doi = html.escape(entry["doi"])
        parts.append(f'<a href="https://doi.org/{doi}">doi:{doi}</a>')
    return " ".join(parts)


def methods_html(markdown: str, bibtex: str, links: Iterable[tuple[str, str]] = ()) -> str:
    """The methods Markdown as HTML paragraphs with citations resolved, then the works cited
    (in order of first citation); ``links``: (href, text) pairs for the source files."""
    bib = parse_bibtex(bibtex)
    cited: list[str] = []

    def note(key: str) -> dict[str, str] | None:
        if key in bib and key not in cited:
            cited.append(key)
        return bib.get(key)

    def group(m: re.Match) -> str:
        keys = _KEY.findall(m.group(1))
        return "(" + "; ".join(cite(note(k), k) for k in keys) + ")"

    def single(m: re.Match) -> str:
        key = m.group(1)
        return cite(note(key), key, narrative=True)

    paragraphs = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        lines = [ln for ln in block.splitlines() if not ln.lstrip().startswith("#")]
        text = " ".join(ln.strip() for ln in lines).strip()
        if not text or text.startswith("Citation keys"):
            continue
        text = html.escape(text, quote=False)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        text = _GROUP.sub(group, text)
        text = re.sub(r"(?<![\w@])@([\w:.-]*\w)", single, text)
        paragraphs.append(f"<p>{text}</p>")
    refs = "".join(f"<li>{reference(bib[k])}</li>" for k in cited)
    out = ['<div class="iqt-methods">', *paragraphs]
    if refs:
        out += ["<h4>References</h4>", f'<ol class="iqt-references">{refs}</ol>']
    if links:
        out.append(
            '<p class="iqt-note">Source: '
            + ", ".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>' for href, text in links)
            + ".</p>"
        )
    out.append("</div>")
    return "\n".join(out)
