"""Model cards: written on save_pretrained and push_to_hub, a user's README kept, the card command."""

import pytest

from hf_rbe import RBEConfig


def test_save_pretrained_writes_the_card_and_keeps_a_users_readme(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_rbe.core.packed import packed_size

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-3"))
    m.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "\n# a\n" in card and 'from_pretrained("a")' in card and ".saving-" not in card  # not the staging dir's name
    assert f"base_model: {tiny_llama_dir}" in card and "import hf_rbe" in card and '"quant_method": "rbe"' in card
    assert f"**{packed_size(m)['bits_per_weight']:.3f} bits per weight**" in card
    assert "Not measured yet" in card
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("my own notes")
    m.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "my own notes"


def test_push_to_hub_uploads_the_rbe_card(tiny_llama_dir, monkeypatch):
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import AutoModelForCausalLM, PreTrainedModel
    from transformers.utils import hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            return type("Repo", (), {"repo_id": repo_id})()

    def fake_card(repo_id, tags=None, token=None):  # what transformers writes when the repo has no card
        return ModelCard.from_template(ModelCardData(library_name="transformers"),
                                       model_description="This model card has been automatically generated.")

    def fake_upload(self, working_dir, repo_id, *a, **kw):
        uploaded["readme"] = (working_dir and open(f"{working_dir}/README.md").read())
        uploaded["repo"] = repo_id

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", fake_card)
    monkeypatch.setattr(PreTrainedModel, "_upload_modified_files", fake_upload)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-3"))
    m.push_to_hub("someone/tiny-rbe")
    assert uploaded["repo"] == "someone/tiny-rbe"
    assert "someone/tiny-rbe" in uploaded["readme"] and "import hf_rbe" in uploaded["readme"]


def test_card_command_adds_metrics(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_rbe.cli import main

    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-3")).save_pretrained(tmp_path)
    main(["card", str(tmp_path), "--base-model", "tiny-llama", "--metrics", '{"wikipedia ppl": 125.0}'])
    card = (tmp_path / "README.md").read_text()
    assert "| wikipedia ppl | 125.0 |" in card and "base_model: tiny-llama" in card
    with pytest.raises(SystemExit, match="not a quantized checkpoint"):
        main(["card", tiny_llama_dir, "--base-model", "x"])
