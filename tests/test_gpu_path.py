"""What a CPU can check of the GPU path's costs: the background writer's snapshot is one flat buffer
the size of the state, and the training loop reads no tensor value back between log lines."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
from conftest import ROOT, TINY
from model import GPT, GPTConfig
from optim import configure_optimizers


def test_snapshot_is_one_buffer_the_size_of_the_state(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=48, block_size=32, vocab_size=100, padded_vocab_size=128))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), 'cpu')['adamw']
    model(torch.randint(0, 100, (2, 32)), torch.randint(0, 100, (2, 32)))[1].backward()
    opt.step()
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'iter_num': 1}
    tensors = checkpoint.flatten(state)[1].values()  # each tensor once (wte / lm_head tied)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    writer = checkpoint.Writer()
    for name in ('a', 'b'):
        os.makedirs(tmp_path / name)
        writer.save(str(tmp_path / name), state, ['latest'])
        writer.wait()
        if name == 'a':
            flat = writer.flat
    assert writer.flat is flat  # the same layout: the buffer is reused
    assert flat.dtype == torch.uint8 and state_bytes <= flat.numel() <= state_bytes + 64 * len(tensors)
    checkpoint.save(tmp_path / 'direct.safetensors', state)  # and the file is the same as a direct save's
    assert (tmp_path / 'b' / 'latest.safetensors').read_bytes() == (tmp_path / 'direct.safetensors').read_bytes()


# train.py with every read of a tensor's value back to the host counted per iteration: on a GPU each
# is a synchronisation that keeps the CPU from queueing the next step while the GPU works. Not
# counted: torch.optim's reads of its step counters, which live on the CPU unless the optimizer is
# fused (then on the GPU, and never read)
COUNT_READS = """
import collections, json, runpy, sys, torch
out, sys.argv = sys.argv[1], sys.argv[2:]
reads = collections.Counter()
for name in ('item', 'tolist', '__bool__', '__float__', '__int__'):
    def counted(self, *a, _real=getattr(torch.Tensor, name), **k):
        if '/torch/optim/' not in sys._getframe(1).f_code.co_filename:
            reads[sys.modules['__main__'].__dict__.get('iter_num', -1)] += 1
        return _real(self, *a, **k)
    setattr(torch.Tensor, name, counted)
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    json.dump(reads, open(out, 'w'))
"""


def test_no_host_reads_between_log_lines(tiny_data, tmp_path):
    (tmp_path / 'count.py').write_text(COUNT_READS)
    counts = tmp_path / 'reads.json'
    p = subprocess.run([sys.executable, str(tmp_path / 'count.py'), str(counts), os.path.join(ROOT, 'train.py'),
                        *TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "out"}',
                        '--max_iters=24', '--log_interval=8', '--eval_interval=1000', '--ckpt_interval=0',
                        '--rolling_interval=0', '--save_best=False', '--save_epochs=False'],
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr
    reads = {int(k): v for k, v in json.load(open(counts)).items()}
    quiet = [it for it in range(1, 24) if it % 8]  # iterations that end with no log line, eval or save
    assert all(reads.get(it, 0) == 0 for it in quiet), reads
    assert all(reads.get(it, 0) >= 1 for it in (8, 16)), reads  # the log line reads its losses, once


def test_fp8_converts_the_block_linears_and_keeps_the_checkpoint(tiny_data, tmp_path):
    pytest.importorskip('torchao')  # an optional dependency (requirements-dev.txt installs it)
    from hardware import convert_to_fp8
    from model import LoRALinear
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, lora_rank=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    convert_to_fp8(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds['transformer.h.0.mlp.c_fc'] == kinds['transformer.h.1.mlp.c_proj'] == 'Float8Linear'
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRALinear) and kinds['lm_head'] == 'Linear'
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())  # the optimizer sees the same weights
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *TINY, '--dataset=tiny',
                        f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "out"}', '--fp8=True'],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count('\n') == 0 and 'compute capability 8.9' in r.stderr
    assert not (tmp_path / 'out').exists()
