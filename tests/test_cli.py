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


@pytest.mark.parametrize("argv", [["eval", "m", "--tokens", "-5"], ["eval", "m", "--tokens", "0"],
                                  ["eval", "m", "--stride", "x"], ["compare", "--context", "0"]])
def test_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and ("must be >= 1" in err or "is not an integer" in err), err


def test_missing_local_model_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        main(["quantize", str(tmp_path / "nope"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no such directory"):
        main(["card", str(tmp_path / "nope"), "--base-model", "x"])


def test_output_that_is_a_file_fails_before_quantizing(tiny_llama_dir, tmp_path, monkeypatch):
    import transformers

    (tmp_path / "out").write_text("x")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded the model before checking the output path"))
    with pytest.raises(SystemExit, match="is a file"):
        main(["quantize", tiny_llama_dir, str(tmp_path / "out")])


def test_empty_output_is_refused_not_the_current_directory(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="current directory"):
        main(["quantize", tiny_llama_dir, ""])
    assert list(tmp_path.iterdir()) == []


def test_bad_json_is_a_message_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="--config is not valid JSON"):
        main(["quantize", "m", str(tmp_path / "o"), "--config", "{idx: 9}"])
    with pytest.raises(SystemExit, match="--metrics is not valid JSON"):
        main(["card", str(tmp_path), "--base-model", "x", "--metrics", "{'a': 1}"])


def test_a_format_1_field_with_a_v2_preset_is_refused_before_loading(tiny_llama_dir, tmp_path, monkeypatch):
    import transformers

    from hf_rbe import ConfigError

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded the model before checking the config"))
    with pytest.raises(ConfigError, match=r"\['idx'\] is not a setting of format 2"):
        main(["quantize", tiny_llama_dir, str(tmp_path / "out"), "--preset", "v2-3", "--config", '{"idx": 7}'])
