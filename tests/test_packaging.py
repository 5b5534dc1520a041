"""Packaging: the kernels ship inside hf_rbe and never pose as Hugging Face's unrelated top-level
``kernels`` package; every subpackage and data file ships (what imports what is
tests/test_layering.py's job)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_kernels_package_and_transformers_does_not_see_one():
    assert not (ROOT / "kernels").exists()  # the kernels are the regular package hf_rbe.kernels
    assert not any(p.is_symlink() for p in (ROOT / "hf_rbe").rglob("*"))  # checkouts without symlinks work
    code = ("import sys; sys.path.insert(0, '.');"
            "from transformers.utils.import_utils import is_kernels_available;"
            "print(is_kernels_available())")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    hf_kernels_installed = subprocess.run([sys.executable, "-m", "pip", "show", "-q", "kernels"],
                                          capture_output=True).returncode == 0
    if not hf_kernels_installed:  # our folder on sys.path must not make transformers think it is there
        assert res.stdout.strip().endswith("False")


def test_wheel_ships_hf_rbe_kernels(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]  # a package list that names a missing folder fails here
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "hf_rbe/kernels/triton_v1.py" in names and "hf_rbe/kernels/dispatch.py" in names
    assert "hf_rbe/evaluation/metrics/perplexity.py" in names and "hf_rbe/core/ops.py" in names
    assert "hf_rbe/core/v2_tables.safetensors" in names and "hf_rbe/kernels/triton_v2.py" in names
    assert "hf_rbe/data/fetch.py" in names and "hf_rbe/hf/quantizer.py" in names
    shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "hf_rbe").rglob("__init__.py")}
    assert on_disk <= shipped, on_disk - shipped  # every subpackage ships
    assert "hf_rbe/hf/model_card.md" in names
    assert not any(n.startswith("kernels/") for n in names)


def test_no_script_is_named_kernels():
    # `python bench/kernels.py` would put bench/ on sys.path, and transformers' probe for HF's
    # `kernels` package would import the script instead (a circular-import crash, seen once).
    for folder in ("bench", "recipes", "."):
        assert not (ROOT / folder / "kernels.py").exists(), folder
