"""The LoRA workflow through the scripts: a base trained on code, a Korean corpus prepared with the
base's tokenizer extended, a LoRA fine-tune with the new rows trainable (config/finetune_lora.py);
what trains, what a checkpoint holds, exact resume, a missing or changed base, sample, list, export."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import runs
from conftest import ROOT, TINY, losses, make_corpus, run
from test_train import wait_for_iter
from test_vocab import korean_corpus

FT = [*TINY, '--lora_rank=4', '--max_iters=20', '--eval_interval=5', '--eval_iters=4', '--ckpt_interval=3',
      '--rolling_interval=0', '--warmup_iters=2']

# the tests share a module fixture that trains: on one pytest-xdist worker, it trains once
pytestmark = pytest.mark.xdist_group('finetune')


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('finetune')
    make_corpus(tmp / 'code')
    korean_corpus(tmp / 'kor')
    data = str(tmp / 'data')
    run('prepare.py', f'--input={tmp / "code"}', '--dataset=base', f'--data_dir={data}', '--vocab_size=300',
        '--val_fraction=0.2', '--min_split_tokens=33')
    run('train.py', *TINY, '--dataset=base', f'--data_dir={data}', f'--out_dir={tmp / "base"}', '--max_iters=30',
        '--eval_interval=10', '--eval_iters=4', '--optimizer=adamw')  # AdamW: the sizes compared hold its two moments
    run('prepare.py', f'--input={tmp / "kor"}', '--dataset=kor', f'--data_dir={data}', '--extend_vocab=64',
        f'--tokenizer={data}/base/tokenizer.json', '--val_fraction=0.2', '--min_split_tokens=33')
    return tmp


def finetune_args(work, out, *extra):
    return [os.path.join(ROOT, 'config', 'finetune_lora.py'), *FT, '--dataset=kor', f'--data_dir={work / "data"}', f'--out_dir={out}',
            f'--init_from={work / "base" / "best.safetensors"}', *extra]


@pytest.fixture(scope='module')
def lora(work):
    out = str(work / 'lora')
    r = run('train.py', *finetune_args(work, out))
    assert 'trained:' in r.stdout  # the trainable / total count and its percentage
    return out


def stored(path):
    """{key: shape} of the tensors a file itself holds (an adapter's, without its base)."""
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_only_adapters_and_new_rows_train(work, lora):
    base = checkpoint.load(work / 'base' / 'best.safetensors')['model']
    tuned = runs.load(os.path.join(lora, 'latest.safetensors'))  # base + adapter, put together on load
    assert tuned['model_args']['vocab_size'] == 364 and tuned['model_args']['lora_rank'] == 4
    for k, v in tuned['model'].items():
        if k.endswith(('lora_A', 'lora_B')):
            continue
        old = base[k]
        if k in ('transformer.wte.weight', 'lm_head.weight'):
            assert torch.equal(v[:300], old[:300]) and not torch.equal(v[300:364], v[300:364].mean(0).expand(64, -1))
        else:
            assert torch.equal(v, old), k  # the base's bytes, untouched
    assert any(v.abs().sum() > 0 for k, v in tuned['model'].items() if k.endswith('lora_B'))


def test_adapter_checkpoint_holds_only_what_trains(work, lora):
    adapter, base = stored(os.path.join(lora, 'latest.safetensors')), stored(work / 'base' / 'best.safetensors')
    weights = {k for k in adapter if k.startswith('model/')}
    assert weights == {'model/transformer.wte.weight'} | {f'model/transformer.h.{i}.attn.{m}.lora_{x}'
                                                         for i in (0, 1) for m in ('c_attn', 'c_proj') for x in 'AB'}
    assert adapter['model/transformer.wte.weight'] == (384 - 300, 32)  # the new rows (and padding) only
    nbytes = lambda shapes: sum(4 * torch.Size(s).numel() for s in shapes.values())
    print(f"adapter tensors {nbytes(adapter)} bytes, base {nbytes(base)} bytes")
    assert nbytes(adapter) < 0.2 * nbytes(base)  # tiny: RNG states weigh; bench/bench_lora.py: a real shape
    listing = run('train.py', f'--out_dir={lora}', '--list').stdout
    assert 'latest ' in listing and 'BAD' not in listing


# muon: the base's matrices train on Muon (trainable=all), the adapters and the rest on AdamW
@pytest.mark.parametrize('optimizer, trainable', [('adamw', 'new_tokens'), ('muon', 'all')])
def test_lora_resume_is_exact(work, tmp_path, optimizer, trainable):
    straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
    extra = ['--eval_interval=1', f'--optimizer={optimizer}', f'--trainable={trainable}']
    run('train.py', *finetune_args(work, straight, *extra))
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *finetune_args(work, stopped, *extra)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'})
    wait_for_iter(stopped, 7, p)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    r = run('train.py', *finetune_args(work, stopped, *extra))  # the same command continues it
    assert 'holds the run this command started' in r.stdout and 'resumed from' in r.stdout
    assert losses(stopped) == losses(straight)
    state = runs.load(os.path.join(stopped, 'latest.safetensors'))
    assert bool(state['optimizers'].get('muon', {}).get('state')) == (optimizer == 'muon')  # Muon's, resumed too
    a, b = state['model'], runs.load(os.path.join(straight, 'latest.safetensors'))['model']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_or_changed_base_is_one_line(work, lora, tmp_path):
    out = str(tmp_path / 'copy')
    shutil.copytree(lora, out)
    os.remove(os.path.join(out, 'base.safetensors'))
    r = run('sample.py', f'--out_dir={out}', '--ckpt=latest', check=False)
    assert r.returncode != 0 and 'base.safetensors is missing' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    shutil.copy(os.path.join(lora, 'best.safetensors'), os.path.join(out, 'base.safetensors'))  # another file
    r = run('sample.py', f'--out_dir={out}', '--ckpt=latest', check=False)
    assert r.returncode != 0 and 'not the file it was trained on' in r.stderr


def test_sample_and_export_merged(work, lora, tmp_path):
    a = run('sample.py', f'--out_dir={lora}', '--start=환자', '--max_new_tokens=20', '--num_samples=1')
    assert a.stdout.startswith('환자')
    merged = str(tmp_path / 'merged.safetensors')
    run('export.py', f'--out_dir={lora}', '--ckpt=latest', f'--out={merged}')
    state = checkpoint.load(merged)
    assert state['model_args']['lora_rank'] == 0 and not any('lora' in k for k in state['model'])
    b = run('sample.py', f'--ckpt={merged}', '--start=환자', '--max_new_tokens=20', '--num_samples=1')
    assert a.stdout == b.stdout  # merged weights sample exactly what base + adapter sample
