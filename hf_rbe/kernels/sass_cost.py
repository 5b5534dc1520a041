"""A static cost model that needs no GPU: compile a Triton kernel for the H100 (sm_90) and read its SASS.

``compile_sm90`` runs Triton's full pipeline for ``GPUTarget("cuda", 90, 32)`` (ptxas ships
with Triton), and :func:`analyse` reports what the cubin says: registers per thread, spill
instructions (local-memory loads/stores), shared memory, and the instructions of the main
loop (the innermost backward branch with the most instructions). Instructions per weight =
main-loop instructions x threads per program / weights one iteration of the program decodes;
at the H100's ~3e13 thread-instructions per second, 1 instruction per weight costs ~2 us on a
4096 x 14336 layer.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")


@dataclass(frozen=True)
class Cost:
    registers: int
    spill_instructions: int
    local_bytes: int
    shared_bytes: int
    loop_instructions: int
    loop_sass: tuple[str, ...]

    def per_weight(self, threads: int, weights_per_iteration: int) -> float:
        return self.loop_instructions * threads / weights_per_iteration


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_sm90(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int = 4,
                 num_stages: int = 3, multiples_of_16: tuple[str, ...] = ()) -> Any:
    """The compiled kernel for sm_90 (``signature``: argument -> Triton type, ``constexprs``: values).

    As a real launch does, every pointer is taken as 16-byte aligned, and so are the integer
    arguments named in ``multiples_of_16`` (Triton specializes on both at launch)."""
    aligned = [k for k, t in signature.items() if t.startswith("*") or k in multiples_of_16]
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs=attrs)
    return triton.compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


def _loop(sass: str) -> tuple[str, ...]:
    """Instructions of the innermost loop with the most instructions (a backward branch's body)."""
    lines, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(lines)
        ins = _INSTR.search(line)
        if ins:
            lines.append(ins.group(2).strip())
    loops = []
    for end, ins in enumerate(lines):
        target = _BRANCH.search(ins)
        if target and target.group(1) in labels and labels[target.group(1)] <= end:
            loops.append((labels[target.group(1)], end))
    innermost = [(a, b) for a, b in loops if not any(a < c <= d < b for c, d in loops if (c, d) != (a, b))]
    if not innermost:
        return ()
    a, b = max(innermost, key=lambda ab: ab[1] - ab[0])
    return tuple(x for x in lines[a : b + 1] if not x.startswith("NOP"))


def analyse(compiled: Any) -> Cost:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    spills = sum(1 for line in sass.splitlines() if re.search(r"\b(STL|LDL)\b", line))
    loop = _loop(sass)
    return Cost(registers=field("REG"), spill_instructions=spills, local_bytes=field("LOCAL"),
                shared_bytes=compiled.metadata.shared, loop_instructions=len(loop), loop_sass=loop)
