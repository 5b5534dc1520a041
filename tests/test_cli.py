"""The hf-rbe command line: quantize a local model, then reload it."""

import json

import pytest

from hf_rbe import RBELinear
from hf_rbe.cli import build_parser, main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("quantize", "eval", "compare", "card", "data"))


def test_quantize_command(tiny_llama_dir, tmp_path, capsys):
    # the tiny model has no tokenizer; give it one so the command can copy it
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    src = tmp_path / "src"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "out"
    main(["quantize", str(src), str(out), "--preset", "rbe-3", "--config", json.dumps({"overrides": {"*.down_proj": {"idx": 10}}})])
    assert "RBE layers" in capsys.readouterr().out
    m = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(m.model.layers[0].mlp.down_proj, RBELinear)
    assert m.model.layers[0].mlp.down_proj.spec.stage.layout.idx == 10
    assert m.model.layers[0].mlp.up_proj.spec.stage.layout.idx == 9
    assert AutoTokenizer.from_pretrained(out) is not None
    card = (out / "README.md").read_text()
    assert "import hf_rbe" in card and "bits per weight" in card and '"quant_method": "rbe"' in card
    from hf_rbe.core.packed import packed_size

    assert "base_model: " + str(src) in card
    assert f"**{packed_size(m)['bits_per_weight']:.3f} bits per weight**" in card


def test_bad_config_json_is_rejected():
    args = build_parser().parse_args(["quantize", "m", "o", "--config", "[1, 2]"])
    from hf_rbe.cli import _config

    with pytest.raises(SystemExit, match="JSON object"):
        _config(args)
