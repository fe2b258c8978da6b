"""Write one generated section of a Markdown results file, keeping the rest of the file."""
from __future__ import annotations

from pathlib import Path

__all__ = ["write_section"]


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section headed ``title`` (up to the next "## " heading) with ``section``, or append it."""
    text = path.read_text()
    if title in text:
        head, _, rest = text.partition(title)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
