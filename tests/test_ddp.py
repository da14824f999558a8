"""DDP on the CPU (gloo): torchrun with 2 processes matches one process with the same global batch,
writes one log and one set of checkpoints, stops cleanly on SIGTERM, and resumes on another world size."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, read_log, run
from test_train import wait_for_iter

ARGS = TINY + ['--dataset=tiny', '--gradient_accumulation_steps=2', '--eval_interval=1', '--eval_iters=20',
               '--ckpt_interval=4', '--rolling_interval=0', '--max_iters=16']


def torchrun(data, out, *extra, nproc=2):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           os.path.join(ROOT, 'train.py'), *ARGS, f'--data_dir={data}', f'--out_dir={out}', *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def losses(out):
    return {e['step']: e['loss'] for e in read_log(out) if 'loss' in e}


@pytest.fixture(scope='module')
def single(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('single'))
    run('train.py', *ARGS, f'--data_dir={tiny_data}', f'--out_dir={out}')
    return out


@pytest.mark.xdist_group('ddp_single')  # with the fixture they share: it trains once
def test_two_processes_match_one(tiny_data, single, tmp_path):
    """With the default optimizer, Muon."""
    p = torchrun(tiny_data, str(tmp_path))
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert stdout.count('done:') == 1 and stdout.count('2 process(es)') == 1  # rank 0 alone prints
    one, two = losses(single), losses(str(tmp_path))
    assert one.keys() == two.keys() == set(range(1, 17))
    # two processes' gradients meet in an all-reduce: sums in another order, losses within 1e-4
    assert all(abs(one[k] - two[k]) < 1e-4 for k in one), (one, two)
    names = sorted(os.listdir(tmp_path))
    assert names == ['best.safetensors', 'latest.safetensors', 'latest_backup.safetensors', 'log.jsonl',
                     'summary.json']
    assert len(read_log(str(tmp_path))) == len(read_log(single))  # one writer


@pytest.mark.xdist_group('ddp_single')
def test_sigterm_saves_once_then_resume_on_one_process(tiny_data, single, tmp_path):
    out = str(tmp_path)
    p = torchrun(tiny_data, out)
    wait_for_iter(out, 5, p)
    os.killpg(p.pid, signal.SIGTERM)  # as a scheduler would: the launcher and its workers
    t0 = time.time()
    stdout, stderr = p.communicate(timeout=120)
    assert time.time() - t0 < 60, "the group did not exit promptly"
    assert stdout.count('stopped by') == 1 and 'resume with the same command' in stdout
    assert '-m torch.distributed.run --standalone --nproc_per_node=2 ' in stdout  # the launcher's flags as given
    stopped = max(losses(out))
    assert stopped < 16
    # the data position is global, so one process continues where two stopped
    run('train.py', *ARGS, f'--data_dir={tiny_data}', f'--out_dir={out}', '--init_from=resume')
    one, resumed = losses(single), losses(out)
    assert resumed.keys() == one.keys()
    assert all(abs(one[k] - resumed[k]) < 1e-4 for k in one)  # two processes, then one: as above


def test_resume_with_dropout_on_two_processes_is_exact(tiny_data, tmp_path):
    """Every rank's RNG is saved, so dropout continues on each rank as if never stopped; with AdamW,
    so that both optimizers run under DDP."""
    straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
    extra = ['--dropout=0.2', '--optimizer=adamw']
    p = torchrun(tiny_data, straight, *extra)
    assert p.wait(timeout=300) == 0
    p = torchrun(tiny_data, stopped, *extra)
    wait_for_iter(stopped, 5, p)
    os.killpg(p.pid, signal.SIGTERM)
    p.communicate(timeout=120)
    assert max(losses(stopped)) < 16
    p = torchrun(tiny_data, stopped, *extra)  # the same command resumes
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0 and 'resumed from' in stdout, stderr
    assert losses(stopped) == losses(straight)  # the same two-process path: exactly


def test_a_data_error_is_said_once(tiny_data, tmp_path):
    p = torchrun(tiny_data, str(tmp_path / 'out'), '--dataset=missing')
    stdout, stderr = p.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if 'error:' in line and 'elastic' not in line]
    assert p.returncode != 0 and len(errors) == 1 and errors[0].startswith('train.py: error: '), stderr
    assert 'meta.json not found' in errors[0]
