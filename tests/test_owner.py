"""Never lose a run, part 3: one trainer per out_dir, a failed write outside the checkpoint writer is
one line with every earlier file intact, and ranks that start from different points stop at once."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

import checkpoint
from conftest import N, ROOT, TINY, args, losses, read_log, run
from test_train import start, wait_for_iter

# train.py with one OS call failing: `fault.py NAME SUFFIX AFTER ERRNO train.py ARGS...` makes
# NAME ('open' for writes, 'replace', 'rename' or 'os.open') raise ERRNO on paths ending in SUFFIX
# after AFTER successful calls, as a full disk or a file system remounted read-only would
FAULT = """
import builtins, errno, os, runpy, sys
name, suffix, after, code = sys.argv[1], sys.argv[2], int(sys.argv[3]), getattr(errno, sys.argv[4])
calls = [0]
def failing(real, path_of):
    def call(*a, **k):
        if str(path_of(a)).endswith(suffix) and (name != 'open' or any(m in (a[1:2] or ['r'])[0] for m in 'wax')):
            calls[0] += 1
            if calls[0] > after:
                raise OSError(code, os.strerror(code), str(path_of(a)))
        return real(*a, **k)
    return call
if name == 'open':
    builtins.open = failing(builtins.open, lambda a: a[0])
else:
    module, attr = (os, name.split('.')[-1])
    setattr(module, attr, failing(getattr(module, attr), lambda a: a[-1] if attr != 'open' else a[0]))
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def faulty(tmp_path, call, suffix, after, code, *train_args):
    script = tmp_path / 'fault.py'
    script.write_text(FAULT)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    return subprocess.run([sys.executable, str(script), call, suffix, str(after), code,
                           os.path.join(ROOT, 'train.py'), *train_args], capture_output=True, text=True, env=env,
                          timeout=300)


def one_line(p):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and 'Traceback' not in p.stderr, (p.returncode, p.stderr)
    return lines[0]


def digests(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), 'rb').read()).hexdigest()
            for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))}


def same_run(out, reference):
    """out holds what a run alone writes: the same files, losses, and final weights and optimizer state."""
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    assert losses(out) == losses(reference)
    a, b = (checkpoint.load(os.path.join(d, 'latest.safetensors')) for d in (out, reference))
    for key in ('model', 'optimizers'):
        ta, tb = checkpoint.flatten(a[key])[1], checkpoint.flatten(b[key])[1]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_two_trainers_on_one_out_dir(tiny_data, reference, tmp_path):
    out = str(tmp_path / 'run')
    # started together: exactly one trains, the other is refused in one line and touches nothing
    first, second = start(tiny_data, out), start(tiny_data, out)
    results = [p.communicate(timeout=300) + (p.returncode,) for p in (first, second)]
    refused = [r for r in results if r[2] != 0]
    assert len(refused) == 1 and len(refused[0][1].strip().splitlines()) == 1, results
    assert 'is in use by pid' in refused[0][1] and 'train.py' in refused[0][1]
    same_run(out, reference)
    # started mid-run: refused, and the live run is unaffected (resumed here from its own checkpoints)
    shutil.rmtree(out)
    live = start(tiny_data, out)
    wait_for_iter(out, 5, live)
    live.send_signal(signal.SIGSTOP)  # paused mid-run, still holding out_dir
    r = run('train.py', *args(tiny_data, out), check=False)
    assert 'is in use by pid' in one_line(r) and live.poll() is None
    assert 'in use by pid' in run('train.py', f'--out_dir={out}', '--list').stdout.splitlines()[0]
    live.send_signal(signal.SIGCONT)
    live.communicate(timeout=300)
    assert live.returncode == 0 and 'train.lock' not in os.listdir(out)
    same_run(out, reference)


def test_killed_owner_does_not_block(tiny_data, reference, tmp_path):
    out = str(tmp_path)
    p = start(tiny_data, out, '--ckpt_interval=1')
    wait_for_iter(out, 6, p)
    p.kill()
    p.wait()
    assert 'train.lock' in os.listdir(out)  # the note stays, the lock is gone with the process
    t0 = time.time()
    r = run('train.py', *args(tiny_data, out))
    assert 'resumed from' in r.stdout and time.time() - t0 < 120
    assert losses(out) == losses(reference)


def test_log_that_cannot_be_written_stops_with_latest(tiny_data, tmp_path):
    out = str(tmp_path)
    p = faulty(tmp_path, 'open', 'log.jsonl', 6, 'EROFS', *args(tiny_data, out))
    line = one_line(p)
    assert 'log.jsonl: Read-only file system' in line and 'with latest saved' in line
    state = checkpoint.load(os.path.join(out, 'latest.safetensors'))  # verifies
    assert f'stopped at iter {state["iter_num"]}' in line and state['iter_num'] < N
    assert read_log(out)  # what was written stays


def test_other_writes_fail_in_one_line_and_touch_nothing(tiny_data, reference, tmp_path):
    out = str(tmp_path / 'run')
    shutil.copytree(reference, out)
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.write('{"step": 99, "loss": 1.0}\n')  # after latest: a resume trims it
    before = digests(out)
    for call, suffix, code, extra, expect in (
            ('open', 'log.jsonl.dropped.tmp', 'ENOSPC', [f'--max_iters={N + 2}'], 'No space left on device'),
            ('os.open', 'train.lock', 'EROFS', [f'--max_iters={N + 2}'], 'Read-only file system'),
            ('rename', '.safetensors', 'EROFS', ['--overwrite=True'], 'cannot move the old run'),
            ('replace', 'summary.json', 'ENOSPC', [f'--max_iters={N + 2}'], 'summary.json')):
        p = faulty(tmp_path, call, suffix, 0, code, *args(tiny_data, out, *extra))
        assert expect in one_line(p), (call, p.stderr)
        if call != 'replace':  # the summary comes after training: the run's new checkpoints are saved
            assert digests(out) == before, call


def test_ranks_that_start_from_different_points_stop(tiny_data, reference, tmp_path):
    # a node-local disk per rank: rank 0 sees a finished run, rank 1 an empty folder
    shutil.copytree(reference, tmp_path / 'rank0')
    cfg = tmp_path / 'local.py'
    cfg.write_text(f"import os\nout_dir = os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'])\n")
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    t0 = time.time()
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(ROOT, 'train.py'), str(cfg), *TINY, '--dataset=tiny', f'--data_dir={tiny_data}',
                        '--gradient_accumulation_steps=2',
                        f'--max_iters={N + 5}', '--lr_schedule=cosine'], capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode != 0 and time.time() - t0 < 200
    errors = [line for line in p.stderr.splitlines() if 'train.py: error' in line]
    assert len(errors) == 1 and 'ranks start from different points' in errors[0], p.stderr
    assert f'at iter {N}' in errors[0] and 'rank 1 from scratch at iter 0' in errors[0]
    assert 'Traceback (most recent call last):\n  File "' + os.path.join(ROOT, 'train.py') not in p.stderr
