"""train.py end to end: training, sampling, exact resume after SIGTERM / SIGINT / kill -9, refusals."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from conftest import N, ROOT, args, losses, read_log, run

def weights(out):
    return checkpoint.load(os.path.join(out, 'latest.safetensors'))['model']


def start(data, out, *extra):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args(data, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_iter(out, k, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(e.get('step', 0) >= k and 'loss' in e for e in read_log(out)):
                return
        except (FileNotFoundError, ValueError):
            pass
        assert proc.poll() is None, f"train.py ended before iter {k}: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"no iter {k} within {timeout}s")


def test_train_then_sample(tiny_data, reference):
    log = read_log(reference)
    train = [e['loss'] for e in log if 'loss' in e]
    assert train[-1] < train[0] - 1.0, "loss did not go down"
    evals = [e for e in log if 'val_loss' in e]
    assert evals[-1]['val_loss'] < evals[0]['val_loss']
    names = set(os.listdir(reference))
    assert {'latest.safetensors', 'latest_backup.safetensors', 'best.safetensors', 'log.jsonl',
            'summary.json'} <= names
    steps = sorted(n for n in names if n.startswith('step_'))
    # the newest keep_last, and where the wsd decay began (kept, to extend the run from)
    assert steps == ['step_0000018.safetensors', 'step_0000020.safetensors', 'step_0000024.safetensors',
                     'step_0000028.safetensors']
    assert any(n.startswith('epoch_') for n in names)  # the tiny corpus is a few epochs
    a = run('sample.py', f'--out_dir={reference}', '--start=def f', '--max_new_tokens=40', '--num_samples=2')
    b = run('sample.py', f'--out_dir={reference}', '--start=def f', '--max_new_tokens=40', '--num_samples=2')
    assert a.stdout == b.stdout and a.stdout.startswith('def f') and len(a.stdout) > 20  # same seed, same text
    c = run('sample.py', f'--out_dir={reference}', '--start=def f', '--max_new_tokens=40', '--seed=2')
    assert c.stdout.split('\n-')[0] != a.stdout.split('\n-')[0]


def test_signals_then_resume_is_exact(tiny_data, reference, tmp_path):
    """SIGTERM, SIGINT, SIGUSR1 and SIGHUP, one after the other on one run: each stops it with a
    checkpoint, the same command resumes it, and the end is bit-identical to an uninterrupted run."""
    out = str(tmp_path)
    for k, sig in zip((5, 11, 17, 23), (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)):
        p = start(tiny_data, out)
        wait_for_iter(out, k, p)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        assert f'stopped by {sig.name}' in stdout and 'resume with the same command' in stdout
        assert max(losses(out)) < N, "the run finished before the signal arrived"
        assert (f'resumed from {out}' in stdout) == (k > 5)  # the same command line resumes
    r = run('train.py', *args(tiny_data, out))
    assert f'resumed from {out}' in r.stdout
    assert losses(out) == losses(reference)
    ref, got = weights(reference), weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_kill9_at_random_moments_then_resume_is_exact(tiny_data, reference, tmp_path):
    out = str(tmp_path)
    rng = random.Random(0)
    # save every iteration so that some kills land in the middle of a save; the same command each time
    extra = ['--ckpt_interval=1']
    for _ in range(5):
        p = start(tiny_data, out, *extra)
        time.sleep(rng.uniform(2.5, 4.0))  # python + torch start-up takes ~2 s
        p.kill()
        p.communicate()
        if p.returncode == 0:
            break
    run('train.py', *args(tiny_data, out, *extra))
    assert losses(out) == losses(reference)
    ref, got = weights(reference), weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert not [n for n in os.listdir(out) if '.tmp' in n], "a temp file was left behind"


def test_corrupt_latest_falls_back(tiny_data, reference, tmp_path):
    out = str(tmp_path)
    p = start(tiny_data, out)
    wait_for_iter(out, 8, p)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    path = os.path.join(out, 'latest.safetensors')
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    r = run('train.py', *args(tiny_data, out, '--init_from=resume'))
    assert 'latest.safetensors' in r.stderr and 'resumed from' in r.stdout
    assert 'latest_backup' in r.stdout
    assert losses(out) == losses(reference)


def test_refusals_are_one_line(tiny_data, reference, tmp_path):
    r = run('train.py', *args(tiny_data, reference, '--init_from=resume', '--n_layer=3'), check=False)
    assert r.returncode != 0 and 'n_layer=2' in r.stderr and '--n_layer=3' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run('train.py', *args(tiny_data, str(tmp_path), '--init_from=resume'), check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    r = run('train.py', *args(tiny_data, reference, '--learnig_rate=1'), check=False)
    assert r.returncode != 0 and "did you mean 'learning_rate'" in r.stderr
    r = run('sample.py', f'--out_dir={tmp_path}', check=False)
    assert r.returncode != 0 and 'python train.py' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_list(reference):
    r = run('train.py', f'--out_dir={reference}', '--list')
    for name in ('latest', 'latest_backup', 'best', 'step_0000028', 'epoch_0001'):
        assert name in r.stdout


def test_new_data_needs_reset_state(tiny_data, reference, tmp_path):
    corpus = tmp_path / 'other'
    corpus.mkdir()
    for i in range(12):
        (corpus / f'{i}.txt').write_text(f"class C{i}:\n    value = {i}\n" * 20)
    for kind in ('byte', 'bpe'):
        run('prepare.py', f'--input={corpus}', f'--dataset=other_{kind}', f'--data_dir={tiny_data}',
            f'--tokenizer={kind}', '--vocab_size=300', '--val_fraction=0.3', '--min_split_tokens=33')
    ckpt = os.path.join(reference, 'latest.safetensors')
    out = str(tmp_path / 'out')
    r = run('train.py', *args(tiny_data, out, f'--init_from={ckpt}', '--dataset=other_byte'), check=False)
    assert r.returncode != 0 and '--reset_state=True' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run('train.py', *args(tiny_data, out, f'--init_from={ckpt}', '--dataset=other_bpe', '--reset_state=True'),
            check=False)
    assert r.returncode != 0 and 'different tokenizer' in r.stderr
    run('train.py', *args(tiny_data, out, f'--init_from={ckpt}', '--dataset=other_byte', '--reset_state=True',
                          '--max_iters=3'))
    log = read_log(out)
    assert [e['step'] for e in log if 'loss' in e] == [1, 2, 3]  # a new run: iteration, optimizer, data reset
    assert log[0]['val_loss'] < 5.0  # but the trained weights (a fresh model starts near ln(257) = 5.5)
