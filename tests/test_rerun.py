"""The same command line starts a run and continues it: re-runs resume, refusals touch nothing,
--overwrite keeps the old run, log.jsonl holds each iteration once, --help, and background saves
write the very bytes a synchronous save writes, and survive a kill -9 mid-write."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import torch

import checkpoint
from conftest import ROOT, TINY, args, losses, read_log, run
from errors import Error
from test_train import start, wait_for_iter


def digests(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(dirpath, n), 'rb') as f:
                out[os.path.relpath(os.path.join(dirpath, n), folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_rerun_resumes_scratch_is_refused_overwrite_moves_aside(tiny_data, reference, tmp_path):
    out = str(tmp_path)
    run('train.py', *args(tiny_data, out, '--max_iters=12', '--lr_decay_iters=30'))  # the reference's schedule
    before = digests(out)
    r = run('train.py', *args(tiny_data, out, '--init_from=scratch'), check=False)
    assert r.returncode != 0 and 'holds a run' in r.stderr and '--overwrite=True' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and digests(out) == before  # nothing touched
    r = run('train.py', *args(tiny_data, out))  # the same command, with max_iters back at N: continues
    assert 'resumed from' in r.stdout and 'iter 12' in r.stdout
    assert losses(out) == losses(reference)
    finished = digests(out)
    r = run('train.py', *args(tiny_data, out, '--overwrite=True', '--max_iters=3'))
    moved = [n for n in os.listdir(out) if n.startswith('previous-')]
    assert len(moved) == 1 and 'moved what was in' in r.stdout
    assert digests(os.path.join(out, moved[0])) == finished  # the old run, whole, under previous-*
    assert [e['step'] for e in read_log(out) if 'loss' in e] == [1, 2, 3]  # a new run, a new log
    r = run('train.py', *args(tiny_data, out, '--overwrite=True', '--init_from=resume'), check=False)
    assert r.returncode != 0 and 'choose one' in r.stderr


def test_log_holds_each_iteration_once_after_kill9(tiny_data, reference, tmp_path):
    out = str(tmp_path)
    p = start(tiny_data, out, '--ckpt_interval=10')
    wait_for_iter(out, 16, p)
    p.kill()
    p.communicate()
    killed_at = max(e['step'] for e in read_log(out))
    r = run('train.py', *args(tiny_data, out, '--ckpt_interval=10'))
    steps = [e['step'] for e in read_log(out) if 'loss' in e]
    assert steps == sorted(set(steps)) == list(range(1, 31))
    assert losses(out) == losses(reference)
    dropped = [json.loads(line)['step'] for line in open(os.path.join(out, 'log.jsonl.dropped'))]
    assert dropped and min(dropped) > 10 and max(dropped) == killed_at and 'moved to log.jsonl.dropped' in r.stdout


def test_requeued_finetune_continues_its_own_run(tiny_data, reference, tmp_path):
    out, base = str(tmp_path), os.path.join(reference, 'best.safetensors')
    finetune = args(tiny_data, out, f'--init_from={base}', '--reset_state=True', '--max_iters=8')
    run('train.py', *finetune[:-1], '--max_iters=4')
    r = run('train.py', *finetune)
    assert 'holds the run this command started' in r.stdout and 'resumed from' in r.stdout
    assert [e['step'] for e in read_log(out) if 'loss' in e] == list(range(1, 9))
    other = os.path.join(reference, 'latest_backup.safetensors')
    r = run('train.py', *args(tiny_data, out, f'--init_from={other}', '--reset_state=True'), check=False)
    assert r.returncode != 0 and 'holds a run' in r.stderr  # another start into the same out_dir: refused


def test_help_lists_keys_with_comments():
    r = run('train.py', '--help')
    assert 'ckpt_interval = 200  # `latest`' in r.stdout and 'async_save = True' in r.stdout
    assert 'executed' in r.stdout  # config files are Python
    assert "ckpt = 'resume'" in run('sample.py', '-h').stdout


def small_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=g)
    return {'model': {'wte': w, 'lm_head': w, 'b': torch.randn(32, generator=g)},  # tied, stored once
            'optimizer': {'state': {0: {'step': torch.tensor(3.0), 'exp_avg': torch.randn(64, 32, generator=g)}},
                          'param_groups': [{'lr': 0.1, 'params': [0]}]},
            'iter_num': 7, 'rng': (1, [2, 3], None), 'time': 1.5}


def test_background_save_writes_the_same_bytes(tmp_path):
    tiers = dict(names=['latest', 'step_0000007', 'best'], keep={'step': 2})
    sync_dir, async_dir = tmp_path / 'sync', tmp_path / 'async'
    sync_dir.mkdir(), async_dir.mkdir()
    state = small_state()
    checkpoint.Writer(background=False).save(str(sync_dir), state, **tiers)
    writer = checkpoint.Writer()
    writer.save(str(async_dir), state, **tiers)
    state['model']['wte'].add_(1.0)  # training goes on meanwhile: the snapshot is unaffected
    writer.wait()
    assert digests(sync_dir) == digests(async_dir) and len(digests(sync_dir)) == 3
    loaded = checkpoint.load(async_dir / 'latest.safetensors')
    assert loaded['model']['wte'] is loaded['model']['lm_head']
    writer.save(str(async_dir), small_state(1), ['latest', 'step_0000008', 'best'], keep={'step': 2})  # buffers reused
    assert writer.wait()[0] == ['latest.safetensors', 'step_0000008.safetensors', 'best.safetensors']


def test_background_write_error_surfaces_and_keeps_earlier_files(tmp_path):
    writer = checkpoint.Writer()
    writer.save(str(tmp_path), small_state(), ['latest'], keep={'step': 2})
    writer.wait()
    state = dict(small_state(), bad=object())  # not serializable: fails in the writer thread
    writer.save(str(tmp_path), state, ['latest'], keep={'step': 2})
    try:
        writer.wait()
        raise AssertionError('the failed write was not reported')
    except Error as e:
        assert 'unsupported type' in str(e)
    assert checkpoint.load(tmp_path / 'latest.safetensors')['iter_num'] == 7


KILL_MID_WRITE = """
import sys, torch, checkpoint
writer = checkpoint.Writer()
state = {'model': {f'w{i}': torch.randn(512, 512) for i in range(24)}, 'iter_num': 0}
for it in range(1, 1000):
    state['iter_num'] = it
    writer.save(sys.argv[1], state, ['latest', f'step_{it:07d}'], keep={'step': 2})
    print(it, flush=True)
"""


def test_kill9_during_background_writes_leaves_valid_checkpoints(tmp_path):
    env = {**os.environ, 'PYTHONPATH': ROOT}
    for saves, delay in ((2, 0.0), (3, 0.05), (4, 0.15)):
        p = subprocess.Popen([sys.executable, '-c', KILL_MID_WRITE, str(tmp_path)], env=env, stdout=subprocess.PIPE)
        started = 0
        while started < saves:  # save k returns once save k - 1 is on disk
            line = p.stdout.readline()
            assert line, 'the saving process ended'
            started = int(line) if line.strip().isdigit() else started
        time.sleep(delay)  # then kill while save k is being written
        p.send_signal(signal.SIGKILL)
        p.communicate()
        files = [n for n in os.listdir(tmp_path) if n.endswith('.safetensors')]
        assert files and all(checkpoint.load(tmp_path / n)['iter_num'] >= 1 for n in files)  # checksums verify


def test_progress_lines_summary_over_resumes_and_list(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    common = [*TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={out}', '--log_interval=2']
    r = run('train.py', *common, '--max_iters=6')
    assert re.search(r'^iter 4/6: loss [\d.]+, lr \S+, [\d.]+ms, [\d.]+k tok/s, mfu \S+, eta \d+(\.\d)?(s|min|h)$',
                     r.stdout, re.M), r.stdout
    first = json.load(open(os.path.join(out, 'summary.json')))
    run('train.py', *common, '--max_iters=10')  # continued: the summary covers both processes
    second = json.load(open(os.path.join(out, 'summary.json')))
    assert second['iters'] == 10 and second['wall_seconds'] > second['wall_seconds_this_process']
    assert second['wall_seconds'] >= 0.8 * first['wall_seconds'] + second['wall_seconds_this_process']
    r = run('train.py', f'--out_dir={tmp_path / "missing"}', '--list', check=False)
    assert r.returncode != 0 and r.stderr.count('\n') == 1 and 'no run to list' in r.stderr
