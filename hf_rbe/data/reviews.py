"""Movie reviews: 10,605 rated snippets (Pang & Lee) from the ``vaderSentiment`` source tarball."""

from __future__ import annotations

from .cache import checked_file

NAME = "movie_reviews"
RAW_FILE = "movieReviewSnippets_GroundTruth.txt"
SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"


def movie_reviews() -> list[dict[str, object]]:
    """10,605 movie-review snippets: ``{"text", "score" (-4..4), "label" (1 if score > 0)}``."""
    path = checked_file(RAW_FILE, SHA256, NAME)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and float(parts[1]) != 0:
            score = float(parts[1])
            rows.append({"text": parts[2].strip(), "score": score, "label": int(score > 0)})
    return rows
