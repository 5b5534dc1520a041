"""hf-rbe compare: size accounting alike for every method, the targets, the rendered table and plot."""

import pytest


def test_quantized_size_counts_every_method_alike(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from hf_rbe import RBELinear
    from hf_rbe.evaluation.compare.methods import methods
    from hf_rbe.evaluation.sizes import quantized_size

    by_name = {m.name: m for m in methods()}
    n_linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # per layer: q, o; k, v (2 kv heads); gate, up, down
    # quanto groups by min(128, in_features): down_proj (in 128, 2/9 of the weights) at 4.25, the rest at 4.5
    quanto4 = (7 / 9) * (4 + 32 / 64) + (2 / 9) * (4 + 32 / 128)
    expect = {"HQQ 2-bit g64": 2 + 32 / 64, "HQQ 4-bit g64": 4 + 32 / 64, "quanto int4": quanto4,
              "bitsandbytes int8": (7 / 9) * (8 + 16 / 64) + (2 / 9) * (8 + 16 / 128),  # int8 + a scale per row
              "RBE rbe-2.5": None}
    for name, bpw in expect.items():
        model = by_name[name].load(tiny_llama_dir, AutoModelForCausalLM)
        n, bits = quantized_size(model)
        assert n == n_linear, name  # the same layers for every method; lm_head stays unquantized
        if bpw is None:  # RBE: what its own layers report (shared tables included)
            bpw = sum(m.storage_bits() for m in model.modules() if isinstance(m, RBELinear)) / n
            assert bpw > 2.5  # the shared 2^7-entry table is not free on 74k weights
        assert bits / n == pytest.approx(bpw, abs=0.05), name


def _rows() -> list[dict]:
    from hf_rbe.evaluation.compare.methods import MINILM, SMOLLM2

    lm = dict(model=SMOLLM2, tokens=8192, tokens_scored=8184, context=1024, stride=1024, load_seconds=1.0,
              peak_load_mib=10.0, bytes_on_disk=None, quantized_weights=100)
    enc = dict(model=MINILM, cos_min=0.1, load_seconds=1.0, peak_load_mib=1.0, bytes_on_disk=1, quantized_weights=10)
    return [
        {**lm, "method": "fp32 (unquantized)", "family": "fp32", "bits_per_weight": 32.0, "wikipedia_ppl": 20.0, "austen_ppl": 30.0},
        {**lm, "method": "RBE rbe-2", "family": "RBE", "bits_per_weight": 2.02, "wikipedia_ppl": 900.0, "austen_ppl": 800.0},
        {**lm, "method": "RBE rbe-3", "family": "RBE", "bits_per_weight": 3.02, "wikipedia_ppl": 22.0, "austen_ppl": 33.0,
         "movie_reviews_ppl": 55.5},
        {**lm, "method": "HQQ 2-bit g64", "family": "HQQ", "bits_per_weight": 2.5, "wikipedia_ppl": 500.0, "austen_ppl": 400.0},
        {**lm, "method": "HQQ 3-bit g64", "family": "HQQ", "bits_per_weight": 3.7, "wikipedia_ppl": 25.0, "austen_ppl": 35.0},
        {"model": SMOLLM2, "method": "bitsandbytes NF4", "family": "bitsandbytes", "error": "RuntimeError: no GPU"},
        {**enc, "method": "RBE rbe-2", "family": "RBE", "bits_per_weight": 2.04, "cos_mean": 0.6, "accuracy": 0.74},
        {**enc, "method": "seed64 + scale", "family": "seed64", "bits_per_weight": 0.1, "cos_mean": 0.99, "accuracy": 0.9},
        {**enc, "method": "quanto int2", "family": "quanto", "bits_per_weight": 2.25, "cos_mean": 0.1, "accuracy": 0.65},
    ]


def test_compare_targets_on_known_rows():
    from hf_rbe.evaluation.compare.report import targets

    got = "\n".join(targets(_rows()))
    # SmolLM2 <= 2.5 bits: the best baseline (HQQ 2-bit, 500) beats RBE rbe-2 (900): missed
    assert "SmolLM2 Wikipedia perplexity: best RBE RBE rbe-2 900 vs best baseline HQQ 2-bit g64 500: **missed**" in got
    # seed64 is ours, not a baseline: MiniLM compares rbe-2 with quanto int2 only
    assert "MiniLM embedding cosine: best RBE RBE rbe-2 0.6 vs best baseline quanto int2 0.1: **met**" in got
    assert "within 15% of fp32: 22 vs 20 (+10%): **met**" in got
    assert "ahead of HQQ 3-bit g64 (3.70 bpw): 22 vs 25: **met**" in got


def test_compare_render_writes_table_and_plot(tmp_path):
    import json

    from hf_rbe.cli import main

    out = tmp_path / "cmp"
    meta = {"machine": "test box", "date": "2026-11-23", "command": "hf-rbe compare", "wall_seconds": 120}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": _rows()}))
    main(["compare", "--render-only", "--out", str(out)])
    md = out.with_suffix(".md").read_text()
    assert "`hf-rbe compare` on test box, 2026-11-23 (2 minutes)" in md
    assert "| Wikipedia ppl | Austen ppl | reviews ppl (held out) |" in md
    assert "| RBE rbe-3 | 3.020 | 22.00 | 33.00 | 55.50 |" in md
    assert "| RBE rbe-2 | 2.020 | 900.00 | 800.00 | - |" in md  # a row measured before the held-out corpus
    assert "| bitsandbytes NF4 | did not run here: RuntimeError: no GPU |" in md
    assert "context 1024, stride 1024" in md
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_merge_replaces_remeasured_rows_and_the_report_says_which_run_measured_what(tmp_path):
    import json

    from hf_rbe.cli import main
    from hf_rbe.evaluation.compare.methods import SMOLLM2, methods
    from hf_rbe.evaluation.compare.run import merged

    calibrated = {m.name: m for m in methods(["RBE v2 calibrated"])}
    assert list(calibrated) == ["RBE v2-2 calibrated", "RBE v2-3 calibrated", "RBE v2-4 calibrated"]
    old_meta = {"machine": "test box", "date": "2026-11-23", "command": "hf-rbe compare", "wall_seconds": 120,
                "families": None}
    new_meta = {"machine": "test box", "date": "2026-11-24", "command": "hf-rbe compare --families RBE --merge",
                "wall_seconds": 600, "families": ["RBE", "RBE v2 calibrated"]}
    lm = dict(model=SMOLLM2, tokens=8192, tokens_scored=8184, context=1024, stride=1024, load_seconds=600.0,
              peak_load_mib=10.0, bytes_on_disk=None, quantized_weights=100, austen_ppl=40.0)
    fresh = [{**lm, "method": "RBE rbe-3", "family": "RBE", "bits_per_weight": 3.02, "wikipedia_ppl": 23.0},
             {**lm, "method": "RBE v2-3 calibrated", "family": "RBE v2 calibrated", "bits_per_weight": 3.05,
              "wikipedia_ppl": 24.0}]
    rows, meta = merged({"meta": old_meta, "rows": _rows()}, fresh, new_meta)
    names = [r["method"] for r in rows if r["model"] == SMOLLM2]
    assert names == ["fp32 (unquantized)", "RBE rbe-2", "RBE rbe-3", "RBE v2-3 calibrated", "HQQ 2-bit g64",
                     "HQQ 3-bit g64", "bitsandbytes NF4"]  # table order; the old rbe-3 row replaced, not doubled
    assert next(r for r in rows if r["method"] == "RBE rbe-3")["wikipedia_ppl"] == 23.0
    assert len(rows) == len(_rows()) + 1 and meta["earlier"] == [old_meta]

    out = tmp_path / "cmp"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}))
    main(["compare", "--render-only", "--out", str(out)])
    md = out.with_suffix(".md").read_text()
    assert "Measured by `hf-rbe compare` on test box, 2026-11-23 (2 minutes); then re-measured or added:" in md
    assert "- RBE, RBE v2 calibrated rows: `hf-rbe compare --families RBE --merge` on test box, 2026-11-24" in md
    assert "| RBE v2-3 calibrated | 3.050 | 24.00 |" in md
    assert "RBE v2-3 calibrated (3.05 bpw) ahead of HQQ 3-bit g64: 24 vs 25: **met**" in md


def test_methods_by_name_keep_exactly_those_rows_and_refuse_unknown_names():
    from hf_rbe.evaluation.compare.methods import methods

    assert [m.name for m in methods(names=["AutoRound W3 g64", "GPTQ W3 g64"])] == ["GPTQ W3 g64", "AutoRound W3 g64"]
    assert [m.name for m in methods(["GPTQ"], names=["AutoRound W3 g64"])] == []  # within the families asked for
    with pytest.raises(ValueError, match=r"no compare row is named \['GPTQ W3 g128'\]"):
        methods(names=["GPTQ W3 g128"])
