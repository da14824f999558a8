"""Shared fixtures: a tiny corpus prepared once, and a helper to run the scripts as a user would;
how pytest-xdist's workers (pytest.ini) share the tests out."""
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny model that still trains: every script accepts these as --key=value
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
        '--eval_iters=2', '--log_interval=1', '--warmup_iters=5', '--learning_rate=3e-3', '--compile=False']

# One thread, in this process's torch and in every process a test starts: pytest.ini runs a
# pytest-xdist worker per CPU, which would oversubscribe them; and on tiny models a second thread
# only spin-waits (tests/test_model.py took 100 s on two threads of a busy machine, 4 s on one)
torch.set_num_threads(1)
os.environ['OMP_NUM_THREADS'] = '1'


def pytest_collection_modifyitems(items):
    """The longest first, so that no worker is left running one alone at the end: the bench smoke
    runs (test_bench.FIGURES: slowest first), then the groups of tests that share a fixture that
    trains (xdist_group), then the rest in their order. Every worker sorts alike, as xdist needs."""
    def rank(item):
        return (0 if item.name.startswith('test_smoke[') and item.module.__name__ == 'test_bench' else
                1 if item.get_closest_marker('xdist_group') else 2)
    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """-n auto: the CPUs this process may run on (psutil, when installed, would count physical
    cores), at most 8: past that the longest tests set the time, and more workers cost memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(cpus, 8)


def run(script, *args, cwd=None, check=True, env=None):
    """Run a top-level script in a subprocess (env: extra variables); return the CompletedProcess."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **(env or {})}
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def run_on_tty(script, *args, cwd=None):
    """Run a top-level script with a terminal (a pty, 100 columns) as its stderr and a pipe as its
    stdout, as a user at a terminal piping the output on; return (returncode, stdout, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # tqdm draws nothing 0 wide
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = b''
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child has closed the terminal
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = p.stdout.read()  # small (a summary, a table), so it cannot fill the pipe while we read the pty
    p.wait(timeout=600)
    return p.returncode, out.decode(), err.decode(errors='replace')


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def make_corpus(folder, n_docs=40):
    """Python-like documents, deterministic, a few KB in all."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n_docs):
        body = ''.join(f"def f{i}_{j}(x, y={j}):\n    return x * {i} + y - {j}\n\n" for j in range(3))
        with open(os.path.join(folder, f'mod{i:03d}.py'), 'w') as f:
            f.write(f'"""Module {i}."""\nimport math\n\n{body}')


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """data_dir holding dataset 'tiny' (byte tokenizer: no training, fast)."""
    root = tmp_path_factory.mktemp('tiny')
    make_corpus(root / 'corpus')
    run('prepare.py', f'--input={root / "corpus"}', '--dataset=tiny', f'--data_dir={root / "data"}',
        '--tokenizer=byte', '--val_fraction=0.2')
    return str(root / 'data')


N = 30  # iterations of the resume runs
# eval every iteration with many batches: slow enough to signal mid-run, and evals change no state
RESUME = TINY + [f'--max_iters={N}', '--eval_interval=1', '--eval_iters=30', '--ckpt_interval=3',
                 '--rolling_interval=4', '--keep_last=3', '--dataset=tiny', '--batch_size=8']


def args(data, out, *extra):
    return [*RESUME, f'--data_dir={data}', f'--out_dir={out}', *extra]


def losses(out):
    """iter -> training loss; a re-run iteration (after kill -9) must log the same loss again."""
    seen = {}
    for e in read_log(out):
        if 'loss' in e:
            assert seen.setdefault(e['step'], e['loss']) == e['loss'], f"iter {e['step']} changed its loss"
    return seen


@pytest.fixture(scope='session')
def reference(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('ref'))
    run('train.py', *args(tiny_data, out))
    return out
