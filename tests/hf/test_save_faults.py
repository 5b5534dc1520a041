"""Saves that are killed, that race, or that aim somewhere odd (``hf_rbe.hf.atomic``): the
checkpoint directory always holds the old model or the new one, whole."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import logits_of as _logits
from transformers import AutoModelForCausalLM

WORKER = str(Path(__file__).with_name("save_worker.py"))


def _worker(*args: str, timeout: int = 600) -> dict:
    res = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shard_old,shard_new", [("-", "-"), ("-", "20KB"), ("20KB", "-")],
                         ids=["single-to-single", "single-to-sharded", "sharded-to-single"])
def test_a_save_killed_before_any_file_operation_leaves_the_old_or_the_new_model(saved, tmp_path, shard_old,
                                                                                 shard_new):
    got = _worker("kill", str(saved["v2-3"][0]), str(saved["rbe-5"][0]), str(tmp_path), shard_old, shard_new)
    outcomes = got["outcomes"]
    assert len(outcomes) > 5 and outcomes[-1]["exit"] == 0  # the last save completed: every kill point was tried
    assert [o["holds"] for o in outcomes if o["holds"] not in ("old", "new")] == []
    assert all(o["tokenizer_kept"] for o in outcomes)
    holds = [o["holds"] for o in outcomes]
    assert holds[0] == "old" and holds[-1] == "new" and holds == sorted(holds, key=("old", "new").index)
    assert got["littered"] and got["leftovers_after_next_save"] == []  # kills litter; the next save cleans up


def _whole(names: set[str]) -> bool:
    """Whether a listing of a checkpoint directory is one complete save: config.json and either the
    single weight file or an index with all its shards (as ``model-0000i-of-0000n.safetensors`` name them)."""
    shards = [n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]
    if "config.json" not in names:
        return False
    if "model.safetensors" in names:
        return not shards and "model.safetensors.index.json" not in names
    total = {int(n[-17:-12]) for n in shards}
    return "model.safetensors.index.json" in names and len(total) == 1 and len(shards) == total.pop()


def test_two_processes_saving_one_directory_take_turns(saved, tmp_path):
    """A single-file and a sharded writer race (12 saves each) while this process lists the directory
    as fast as it can: every listing is one whole save, and so is the end."""
    target, start = tmp_path / "ckpt", tmp_path / "go"
    AutoModelForCausalLM.from_pretrained(saved["v2-3"][0]).save_pretrained(target)
    writers = [subprocess.Popen([sys.executable, WORKER, "write", str(saved[p][0]), str(target), shard, "12", str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for p, shard in (("v2-3", "-"), ("rbe-5", "20KB"))]
    time.sleep(1)
    start.write_text("")
    listings, broken = 0, []
    while any(w.poll() is None for w in writers):
        fd = os.open(target, os.O_RDONLY)
        try:
            names = set(os.listdir(fd))
            if os.stat(target).st_ino != os.fstat(fd).st_ino:
                continue  # swapped out while being read: the old directory, not the one the name holds
        finally:
            os.close(fd)
        listings += 1
        if not _whole(names):
            broken.append(sorted(names))
    for w in writers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
    assert listings > 100 and broken == []
    got = _logits(AutoModelForCausalLM.from_pretrained(target))
    assert any(torch.equal(got, saved[p][1]) for p in ("v2-3", "rbe-5"))
    weights = sorted(p.name for p in target.glob("model*"))
    assert weights == ["model.safetensors"] or "model.safetensors" not in weights  # one save's files, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "go"]  # no staging directory left


def test_saving_to_the_empty_path_is_refused(saved, tmp_path, monkeypatch):
    m = AutoModelForCausalLM.from_pretrained(saved["v2-3"][0])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current directory"):
        m.save_pretrained("")
    assert list(tmp_path.iterdir()) == []


def test_a_symlinked_target_on_another_filesystem_is_saved_through(saved, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    d, ref = saved["v2-3"]
    real = Path(os.path.realpath(shm)) / f"rbe-link-{os.getpid()}"
    try:
        real.mkdir()
        link = tmp_path / "ckpt"
        link.symlink_to(real)
        AutoModelForCausalLM.from_pretrained(d).save_pretrained(link)
        assert link.is_symlink()
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(link)), ref)
        assert not any(p.name.startswith(f".{real.name}.saving-") for p in real.parent.iterdir())
    finally:
        import shutil

        shutil.rmtree(real, ignore_errors=True)


def test_a_new_checkpoint_directory_gets_the_usual_permissions(saved, tmp_path):
    umask = os.umask(0o022)
    try:
        AutoModelForCausalLM.from_pretrained(saved["v2-3"][0]).save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(umask)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755  # not the staging directory's 0700


def test_where_directories_cannot_be_swapped_files_are_moved_in_one_by_one(saved, tmp_path, monkeypatch, caplog):
    import hf_rbe.hf.atomic

    monkeypatch.setattr(hf_rbe.hf.atomic, "exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    AutoModelForCausalLM.from_pretrained(saved["v2-3"][0]).save_pretrained(target, max_shard_size="20KB")
    (target / "tokenizer.json").write_text("{}")
    with caplog.at_level("WARNING", logger="hf_rbe.hf.atomic"):
        AutoModelForCausalLM.from_pretrained(saved["rbe-5"][0]).save_pretrained(target)
    assert "one by one" in caplog.text
    assert sorted(p.name for p in target.glob("model*")) == ["model.safetensors"]
    assert (target / "tokenizer.json").exists()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), saved["rbe-5"][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
