"""Tests for checkpoint.py: python -m pytest -q tests/test_checkpoint.py"""
import errno
import os
import pickle
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ck  # noqa: E402
import runs  # noqa: E402
from errors import Error as CheckpointError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

def tiny_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8), nn.Linear(8, 16, bias=False))
    m[2].weight = m[0].weight  # tied, like wte / lm_head
    return m

def train_steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 16, (4, 5), generator=g)
        loss = nn.functional.cross_entropy(model(x).view(-1, 16), x.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

ARGS = dict(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16, bias=True, dropout=0.0)
TOKENIZER = {"kind": "byte", "fingerprint": "byte", "vocab_size": 16, "eot_id": 15, "json": None}

def make_state(iter_num=0, val_loss=None):
    """A checkpoint the scripts can use: a tiny GPT's weights, its model_args, a tokenizer record."""
    torch.manual_seed(0)
    return {"model": GPT(GPTConfig(**ARGS)).state_dict(), "model_args": ARGS, "tokenizer": TOKENIZER,
            "iter_num": iter_num, "val_loss": val_loss, "epoch": 0,
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "data": {"pos": iter_num}}

def test_round_trip(tmp_path):
    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train_steps(m, opt, 1)
    state = {"model": m.state_dict(), "optimizer": opt.state_dict(), "iter_num": 7, "flag": True,
             "none": None, "name": "x/y", "lr": 0.1 + 0.2, "inf": float("inf"), "pair": (1, "a"),
             "ints": {3: "three", "3": "str three", (1, 2): [1.5]}, "tricky": {"__tensor__": "not a ref"},
             "bf16": torch.randn(3, 5).to(torch.bfloat16), "fp16": torch.randn(2).half(), "scalar": torch.tensor(2.5),
             "np": np.float32(1.25), "rng": runs.rng_state()}
    ck.save(tmp_path / "a.safetensors", state)
    got = ck.load(tmp_path / "a.safetensors")
    assert got["model"]["0.weight"] is got["model"]["2.weight"]  # tied: stored once, one object
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    for k in ("iter_num", "flag", "none", "name", "lr", "inf", "pair", "ints", "tricky"):
        assert got[k] == state[k] and type(got[k]) is type(state[k])
    assert got["np"] == 1.25
    for k in ("bf16", "fp16", "scalar"):
        assert got[k].dtype == state[k].dtype and got[k].shape == state[k].shape and torch.equal(got[k], state[k])
    assert got["optimizer"]["state"][0]["step"].shape == ()
    assert ck.read_info(tmp_path / "a.safetensors") == {"iter_num": 7}

def test_adamw_continues_bit_identically(tmp_path):
    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(m, opt, 3)
    ck.save(tmp_path / "c.safetensors", {"model": m.state_dict(), "optimizer": opt.state_dict()})
    got = ck.load(tmp_path / "c.safetensors")
    m2 = tiny_model()
    m2.load_state_dict(got["model"])
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(got["optimizer"])
    assert len(opt2.state) == len(opt.state) > 0  # str keys would have been dropped silently
    train_steps(m, opt, 2, seed=5)
    train_steps(m2, opt2, 2, seed=5)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)

def test_truncated_and_fallback(tmp_path):
    for i in (100, 200):
        ck.save_tiers(tmp_path, make_state(i), ["latest"], keep={"step": 3})
    p = tmp_path / "latest.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="truncated"):
        ck.load(p)
    path, state, skipped = ck.find_resume(tmp_path)
    assert path.endswith("latest_backup.safetensors") and state["iter_num"] == 100
    assert len(skipped) == 1 and skipped[0].startswith("latest.safetensors: truncated")
    p.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        ck.load(p)

def test_bit_flip(tmp_path):
    p = tmp_path / "x.safetensors"
    ck.save(p, {"w": torch.zeros(1000)})
    data = bytearray(p.read_bytes())
    data[-2000] ^= 0x10  # inside the tensor bytes
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ck.load(p)

class Evil:
    def __reduce__(self):
        return (open, (os.environ["MARKER"], "w"))

def test_foreign_files_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MARKER", str(marker))
    (tmp_path / "latest.safetensors").write_bytes(pickle.dumps(Evil()))
    torch.save({"w": torch.ones(2)}, tmp_path / "latest_backup.safetensors")
    (tmp_path / "step_0000001.safetensors").write_bytes(os.urandom(3000))
    (tmp_path / "step_0000002.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pickle"):
        ck.load(tmp_path / "latest.safetensors")
    with pytest.raises(CheckpointError, match="zip"):
        ck.load(tmp_path / "latest_backup.safetensors")
    with pytest.raises(CheckpointError) as e:
        ck.find_resume(tmp_path)
    assert "\n" not in str(e.value) and "latest.safetensors: is a pickle" in str(e.value)
    with pytest.raises(CheckpointError, match="No such file"):
        ck.load(tmp_path / "missing.safetensors")
    assert not marker.exists()
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors", metadata={"format": "sturdygpt-checkpoint-99"})
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        ck.load(tmp_path / "plain.safetensors")

def test_rotation_and_pruning(tmp_path):
    for i in range(1, 26):
        names = ["latest", f"step_{i * 10:07d}"] + [f"epoch_{i // 5:04d}"] * (i % 5 == 0) + ["best"] * (i % 2 == 1)
        ck.save_tiers(tmp_path, make_state(i * 10, val_loss=1.0 / i), names, keep={"step": 10},
                      protect=[tmp_path / "step_0000020.safetensors"])
    names = sorted(os.listdir(tmp_path))
    steps = [f"step_{i * 10:07d}.safetensors" for i in [2] + list(range(16, 26))]
    epochs = [f"epoch_{e:04d}.safetensors" for e in range(1, 6)]
    assert names == sorted(steps + epochs + ["best.safetensors", "latest.safetensors", "latest_backup.safetensors"])
    assert ck.load(tmp_path / "latest.safetensors")["iter_num"] == 250
    assert ck.load(tmp_path / "latest_backup.safetensors")["iter_num"] == 240
    assert ck.load(tmp_path / "best.safetensors")["iter_num"] == 250
    assert ck.load(tmp_path / "step_0000200.safetensors")["iter_num"] == 200  # a hard link of an older latest
    assert os.stat(tmp_path / "latest.safetensors").st_ino == os.stat(tmp_path / "step_0000250.safetensors").st_ino
    written, disk = ck.save_tiers(tmp_path, make_state(260), ["latest"], keep={"step": 10})
    assert written == ["latest.safetensors"]
    assert ck.load(tmp_path / "step_0000250.safetensors")["iter_num"] == 250  # untouched by the new latest
    files = [tmp_path / n for n in os.listdir(tmp_path)]
    once_per_inode = sum({os.stat(p).st_ino: os.stat(p).st_size for p in files}.values())
    assert disk == once_per_inode < sum(os.stat(p).st_size for p in files)

def test_failed_save_leaves_files_intact(tmp_path, monkeypatch):
    ck.save_tiers(tmp_path, make_state(10), ["latest", "step_0000010"], keep={"step": 5})
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        ck.save_tiers(tmp_path, make_state(20), ["latest", "step_0000020"], keep={"step": 5})
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="No space left"):
        ck.save(tmp_path / "latest.safetensors", make_state(30))
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # and no temp left behind
    if os.geteuid() != 0:  # root ignores permissions, hence the monkeypatched fsync above
        os.chmod(tmp_path, 0o555)
        with pytest.raises(CheckpointError, match="Permission denied"):
            ck.save(tmp_path / "latest.safetensors", make_state(40))
        os.chmod(tmp_path, 0o755)
        assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="cannot save"):
        ck.save(tmp_path / "file" / "x.safetensors", make_state())
    with pytest.raises(CheckpointError, match="cannot save"):
        ck.save_tiers(tmp_path / "missing", make_state(), ["latest"], keep={"step": 5})
    with pytest.raises(CheckpointError, match="unsupported type"):
        ck.save(tmp_path / "y.safetensors", {"f": print})

def test_stale_scratch_of_dead_process_removed(tmp_path):
    dead = tmp_path / ".ckpt-tmp-999999999"
    dead.mkdir()
    (dead / ".tmpAbC123").write_bytes(b"half a checkpoint")
    ck.save(tmp_path / "latest.safetensors", make_state())
    assert sorted(os.listdir(tmp_path)) == ["latest.safetensors"]

def test_resolve(tmp_path):
    for i, ep in ((100, None), (200, 2)):
        names = ["latest", f"step_{i:07d}"] + ([f"epoch_{ep:04d}"] if ep else []) + ["best"]
        ck.save_tiers(tmp_path, make_state(i), names, keep={"step": 5})
    d = str(tmp_path)
    for arg, name in (("latest", "latest"), ("latest_backup.safetensors", "latest_backup"), ("best", "best"),
                      ("step_0000100", "step_0000100"), ("step_100", "step_0000100"), ("epoch_0002", "epoch_0002")):
        assert ck.resolve(arg, d) == os.path.join(d, name + ".safetensors")
    assert ck.resolve(os.path.join(d, "step_0000200.safetensors"), "elsewhere").endswith("step_0000200.safetensors")
    assert ck.resolve(d, "elsewhere") == os.path.join(d, "latest.safetensors")
    with pytest.raises(CheckpointError, match=r"'step_0000300' not found .*have: best, epoch_0002, latest"):
        ck.resolve("step_0000300", d)

def test_list_checkpoints(tmp_path):
    for i in (100, 200, 300):
        names = ["latest"] * (i == 300) + [f"step_{i:07d}"] + ["epoch_0001"] * (i == 200) + ["best"] * (i == 300)
        ck.save_tiers(tmp_path, make_state(i, val_loss=3.0 - i / 100), names, keep={"step": 5})
    p = tmp_path / "step_0000100.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 1
    p.write_bytes(bytes(data))
    rows = {r["name"]: r for r in ck.list_checkpoints(tmp_path)}
    assert sorted(rows) == ["best", "epoch_0001", "latest", "step_0000100", "step_0000200", "step_0000300"]
    assert rows["step_0000100"]["ok"] is False and "checksum" in rows["step_0000100"]["error"]
    assert all(r["ok"] for n, r in rows.items() if n != "step_0000100")
    assert (rows["epoch_0001"]["tier"], rows["epoch_0001"]["iter"], rows["epoch_0001"]["val_loss"]) == ("epoch", 200, 1.0)
    text = ck.format_listing(list(rows.values()))
    assert "BAD: checksum mismatch" in text and "step_0000300" in text and len(text.splitlines()) == 8
    assert ck.find_resume(tmp_path)[1]["iter_num"] == 300

def test_rng_round_trip(tmp_path):
    def draw():
        return random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    ck.save(tmp_path / "r.safetensors", {"rng": runs.rng_state()})
    expected = draw()
    draw()
    runs.set_rng_state(ck.load(tmp_path / "r.safetensors")["rng"])
    assert draw() == expected

def test_no_hard_links_falls_back_to_copy(tmp_path, monkeypatch):
    def refuse(*a):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", refuse)
    ck.save_tiers(tmp_path, make_state(10), ["latest", "step_0000010"], keep={"step": 5})
    a, b = tmp_path / "latest.safetensors", tmp_path / "step_0000010.safetensors"
    assert os.stat(a).st_ino != os.stat(b).st_ino and ck.load(a)["iter_num"] == ck.load(b)["iter_num"] == 10

def test_header_length_byte_like_pickle_opcode(tmp_path):
    # a valid header whose length starts with byte 0x80 (pickle's PROTO opcode) must still load
    p, pad = tmp_path / "h.safetensors", 0
    for _ in range(10):
        ck.save(p, {"w": torch.ones(2), "pad": "x" * pad})
        if p.read_bytes()[0] == 0x80:
            break
        pad += (0x80 - p.read_bytes()[0]) % 256
    assert p.read_bytes()[0] == 0x80 and ck.load(p)["pad"] == "x" * pad
