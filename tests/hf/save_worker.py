"""Subprocess side of ``test_save_faults.py``: saves that are killed, and saves that race.

    python save_worker.py kill OLD_DIR NEW_DIR WORK SHARD_OLD SHARD_NEW   # prints one JSON line
    python save_worker.py write MODEL_DIR TARGET SHARD ROUNDS START_FILE

``kill``: for k = 1, 2, ... a forked child saves the model of NEW_DIR over a fresh copy of the
checkpoint OLD_DIR (re-saved single-file or sharded first) and is killed (``os._exit``) just
before its k-th file operation (every write-open, rename, removal, directory creation, link and
foreign call Python's audit hooks report); the parent then loads the directory and says which
model it holds. It stops at the first k the save outlives. ``write``: ROUNDS saves of MODEL_DIR
into TARGET, starting when START_FILE appears.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # no OpenMP pool in the parent: a forked child may compute

from transformers import AutoModelForCausalLM  # noqa: E402

import hf_rbe  # noqa: E402, F401

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 3]])
FILE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.chmod",
               "os.truncate", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.rmtree",
               "shutil.copytree", "shutil.move", "tempfile.mkdtemp", "ctypes.call_function"}
KILLED = 77


def is_file_operation(event: str, args: tuple) -> bool:
    if event == "open":
        mode, flags = args[1], args[2]
        return (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) != 0)
    return event in FILE_EVENTS


def logits(path: Path) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(path).eval()(IDS).logits
    except Exception:  # what the test reports: a directory that does not load
        return None


def killed_save(model: torch.nn.Module, target: Path, shard: str | None, k: int) -> int:
    pid = os.fork()
    if pid == 0:
        count = 0

        def hook(event: str, args: tuple) -> None:
            nonlocal count
            if is_file_operation(event, args):
                count += 1
                if count == k:
                    os._exit(KILLED)

        sys.addaudithook(hook)
        try:
            model.save_pretrained(target, **({"max_shard_size": shard} if shard else {}))
        except BaseException:
            os._exit(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def kill(old_dir: str, new_dir: str, work: str, shard_old: str, shard_new: str) -> None:
    work_path = Path(work)
    old_model = AutoModelForCausalLM.from_pretrained(old_dir).eval()
    pristine = work_path / "pristine"
    old_model.save_pretrained(pristine, **({"max_shard_size": shard_old} if shard_old != "-" else {}))
    (pristine / "tokenizer.json").write_text("{}")  # a file of the user's
    new_model = AutoModelForCausalLM.from_pretrained(new_dir).eval()
    want = {"old": logits(pristine), "new": logits(Path(new_dir))}
    outcomes = []
    for k in range(1, 500):
        target = work_path / f"k{k}" / "ckpt"
        shutil.copytree(pristine, target)
        code = killed_save(new_model, target, None if shard_new == "-" else shard_new, k)
        got = logits(target)
        held = next((name for name, ref in want.items() if got is not None and torch.equal(got, ref)), "neither")
        outcomes.append({"k": k, "exit": code, "holds": held, "tokenizer_kept": (target / "tokenizer.json").exists()})
        if code != KILLED:
            break
    # a kill leaves staging directories beside the checkpoint; the next save there removes them
    littered = [o["k"] for o in outcomes if any(p.name != "ckpt" for p in (work_path / f"k{o['k']}").iterdir())]
    after = None
    if littered:
        target = work_path / f"k{littered[0]}" / "ckpt"
        new_model.save_pretrained(target)
        after = sorted(p.name for p in target.parent.iterdir() if p.name != "ckpt")
    print(json.dumps({"outcomes": outcomes, "littered": littered, "leftovers_after_next_save": after}), flush=True)


def write(model_dir: str, target: str, shard: str, rounds: str, start_file: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    while not Path(start_file).exists():
        time.sleep(0.01)
    for _ in range(int(rounds)):
        model.save_pretrained(target, **({"max_shard_size": shard} if shard != "-" else {}))
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    {"kill": kill, "write": write}[sys.argv[1]](*sys.argv[2:])
