"""Text from the user (argv, stdin, a file, a request) made sure to be Unicode a tokenizer takes.

Python hands argv bytes that are not UTF-8 over as lone surrogates (``'\\xff'`` -> ``'\\udcff'``),
which tokenizers reject with a TypeError deep inside; stdin read in text mode fails or passes
them on depending on the locale. So text is read as bytes, decoded strictly, and checked here,
before a model is loaded.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from kvtier.errors import KvtierError

_SURROGATE = re.compile("[\ud800-\udfff]")


def read_text(source: str) -> str:
    """The UTF-8 text of the file ``source``, or of stdin when ``source`` is ``-``."""
    if source == "-":
        name, data = "stdin", sys.stdin.buffer.read()
    else:
        name = source
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise KvtierError(f"cannot read {source}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KvtierError(f"{name} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset "
                          f"{e.start} ({e.reason}); save it as UTF-8 "
                          "(for Latin-1 text: iconv -f LATIN1 -t UTF-8)") from None


def check_text(text: str, what: str = "the prompt") -> str:
    """``text`` itself, or a :class:`KvtierError` naming the first lone surrogate in it."""
    if m := _SURROGATE.search(text):
        code = ord(m.group())
        origin = (f"the byte 0x{code - 0xdc00:02x}, which is not UTF-8" if 0xdc80 <= code <= 0xdcff
                  else f"a lone surrogate U+{code:04X}")
        raise KvtierError(f"{what} is not valid text: character {m.start()} is {origin}; "
                          "give UTF-8 text")
    return text
