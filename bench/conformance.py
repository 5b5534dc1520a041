"""The compatibility table: which Transformers flows work on which model family, dtype and codec.

    python bench/conformance.py                     # runs tests/hf/test_conformance.py, writes runs/conformance.{json,md}
    python bench/conformance.py --out results/conformance   # replaces the committed table

The table is generated from the conformance suite's own results (pytest's JUnit XML), so it says
exactly what the tests assert and nothing more. Rows: flows; columns: model family x compute
dtype; a cell lists the codecs whose test passed ("all" when every codec did), and names those
that failed or were skipped.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_rbe.evaluation.results import run_meta, write_results  # noqa: E402

SUITE = Path(__file__).resolve().parents[1] / "tests" / "hf" / "test_conformance.py"
FAMILIES, DTYPES, CODECS = ("llama", "gpt2", "bert"), ("fp32", "fp16", "bf16"), ("v1", "v2", "seed64", "v2-calibrated")
_CASE = re.compile(r"(?:(?P<pre>[\w-]+?)-)?(?P<family>llama|gpt2|bert)-(?P<dtype>fp32|fp16|bf16)-"
                   r"(?P<codec>v2-calibrated|v1|v2|seed64)(?:-(?P<post>[\w-]+))?$")


def run_suite() -> list[dict]:
    """Run the suite; one row per test case: flow, family, dtype, codec, outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SUITE),
                        f"--junitxml={xml}"], check=False)
        tree = ET.parse(xml)
    rows = []
    for case in tree.iter("testcase"):
        name = case.get("name", "")
        flow, _, params = name.partition("[")
        m = _CASE.match(params.rstrip("]"))
        if not m:
            continue
        extra = "-".join(x for x in (m["pre"], m["post"]) if x)
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        rows.append({"flow": flow.removeprefix("test_") + (f" ({extra})" if extra else ""), "family": m["family"],
                     "dtype": m["dtype"], "codec": m["codec"], "outcome": outcome})
    return rows


def table(rows: list[dict], meta: dict) -> str:
    cells: dict[tuple[str, str, str], dict[str, str]] = defaultdict(dict)
    flows = list(dict.fromkeys(r["flow"] for r in rows))
    for r in rows:
        cells[(r["flow"], r["family"], r["dtype"])][r["codec"]] = r["outcome"]
    cols = [(f, d) for f in FAMILIES for d in DTYPES]
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}", "",
             f"Codecs: v1 = rbe-3, v2 = v2-3, seed64 = seed64 + rbe residual, v2-calibrated = v2-3 calibrated. "
             f"{sum(r['outcome'] == 'passed' for r in rows)} of {len(rows)} cases passed.", "",
             "| flow | " + " | ".join(f"{f} {d}" for f, d in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for flow in flows:
        out = []
        for f, d in cols:
            got = cells.get((flow, f, d), {})
            if not got:
                out.append("-")
            elif all(v == "passed" for v in got.values()) and len(got) == len(CODECS):
                out.append("all")
            else:
                out.append(", ".join(c if v == "passed" else f"{c}: **{v}**" for c, v in got.items()))
        lines.append(f"| {flow} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/conformance")
    args = ap.parse_args()
    rows = run_suite()
    if not rows:
        raise SystemExit("the conformance suite produced no results")
    meta = run_meta()
    md = table(rows, meta)
    write_results(args.out, meta, rows, md)
    print(md)


if __name__ == "__main__":
    main()
