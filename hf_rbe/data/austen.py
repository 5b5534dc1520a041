"""Jane Austen's six novels, from the R data of the Debian package ``r-cran-janeaustenr``."""

from __future__ import annotations

import gzip
import zlib

from .cache import checked_file

NAME = "austen"
#: cache file -> SHA-256: the R lazy-load index (.rdx) and database (.rdb)
FILES = {"janeaustenr/Rdata.rdx": "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f",
         "janeaustenr/Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"}


def _r_object(blob: bytes) -> object:
    import warnings

    import rdata

    with warnings.catch_warnings():  # a bare serialized object has no file header: rdata warns, then parses it right
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def _reflow(lines: list[str]) -> str:
    """Book lines hard-wrapped at ~70 columns -> paragraphs (one per line pair), so that a
    language model is scored on prose, not on the typesetter's line breaks."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(paragraphs)


def austen_novels() -> list[dict[str, str]]:
    """Jane Austen's six novels as ``{"title", "text"}`` (paragraphs reflowed), from the
    R lazy-load database of ``r-cran-janeaustenr``: the ``.rdx`` index (gzip) gives each novel's
    offset and length in the ``.rdb`` file, where it is a 4-byte length plus a zlib stream."""
    rdx, rdb_path = (checked_file(name, digest, NAME) for name, digest in FILES.items())
    index = _r_object(gzip.decompress(rdx.read_bytes()))
    rdb = rdb_path.read_bytes()
    novels = []
    for title, (offset, length) in index["variables"].items():  # type: ignore[index]
        lines = _r_object(zlib.decompress(rdb[int(offset) + 4 : int(offset) + int(length)]))
        novels.append({"title": str(title), "text": _reflow([str(x) for x in lines])})  # type: ignore[union-attr]
    return novels
