"""
Kill training with SIGKILL at random moments, many times, restarting each time with the same
command line, and check that nothing is ever lost:

    python bench/torture.py                    # 100 kills, then 30 kills each followed by a damaged latest
    python bench/torture.py --kills=20 --corrupt=5 --sync
    python bench/torture.py --kills=2 --corrupt=1 --iters=100     # a quick check

A tiny model on a generated corpus; saves are slowed down on purpose (a sleep before each fsync,
patched in by the launcher, not in train.py), so that many kills land in the middle of a save.
Checks: every restart after the first completed save resumed from a valid checkpoint; the final
weights and optimizer state equal an uninterrupted run's bit for bit; iterations lost per kill
(reached before the kill minus resumed from) stay within ckpt_interval plus what ran while a
background save was being written; the live log holds each iteration once.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import runs  # noqa: E402
from errors import Error, report  # noqa: E402

# train.py with every fsync slowed down (each save fsyncs its file and the directory)
SLOW = """
import runpy, sys, time
import files
fsync, delay = files.fsync, float(sys.argv[1])
files.fsync = lambda path: (time.sleep(delay), fsync(path))[1]
sys.argv = [sys.argv[2]] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""

ap = argparse.ArgumentParser()
ap.add_argument('--kills', type=int, default=100)
ap.add_argument('--corrupt', type=int, default=30, help='kills each followed by truncating or flipping a bit of latest')
ap.add_argument('--sync', action='store_true', help='async_save=False (then at most ckpt_interval is lost)')
ap.add_argument('--slow', type=float, default=0.15, help='seconds of sleep before each fsync of a save')
ap.add_argument('--seed', type=int, default=0)
ap.add_argument('--iters', type=int, default=400, help='iterations of each training run')
args = ap.parse_args()
for name, least in (('kills', 0), ('corrupt', 0), ('iters', 1), ('slow', 0)):
    if not least <= getattr(args, name) < float('inf'):
        ap.error(f"--{name} must be at least {least}, got {getattr(args, name)}")
if not args.kills and not args.corrupt:
    ap.error("--kills=0 and --corrupt=0 test nothing; give either at least 1")
sys.excepthook = report  # an Error is one line
rng = random.Random(args.seed)
work = tempfile.mkdtemp(prefix='torture_')
ITERS, CKPT = args.iters, 10
corpus = os.path.join(work, 'corpus')
os.makedirs(corpus)
for i in range(60):
    with open(os.path.join(corpus, f'm{i}.py'), 'w') as f:
        f.write(''.join(f"def f{i}_{j}(x):\n    return x * {i} + {j}\n\n" for j in range(8)))
subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), f'--input={corpus}', '--dataset=t',
                f'--data_dir={work}/data', '--tokenizer=byte', '--min_split_tokens=65'], check=True,
               stdout=subprocess.DEVNULL)
COMMON = ['--dataset=t', f'--data_dir={work}/data', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
          '--batch_size=8', f'--max_iters={ITERS}', '--eval_interval=100', '--eval_iters=2', '--log_interval=1',
          f'--ckpt_interval={CKPT}', '--rolling_interval=50', '--keep_last=3', '--dropout=0.1',
          f'--async_save={not args.sync}', '--compile=False']
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}


def start(out, slow):
    return subprocess.Popen([sys.executable, '-c', SLOW, str(slow), os.path.join(ROOT, 'train.py'), *COMMON,
                             f'--out_dir={out}'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def reached(out):
    try:
        with open(os.path.join(out, 'log.jsonl')) as f:
            return max([json.loads(line)['step'] for line in f if line.endswith('\n')] or [0])
    except FileNotFoundError:
        return 0


def final_state(out):
    s = checkpoint.load(os.path.join(out, 'latest.safetensors'))
    tensors = {f'm/{k}': v for k, v in s['model'].items()}
    for opt, saved in s['optimizers'].items():  # AdamW's, and Muon's with optimizer=muon (the default)
        for i, st in saved['state'].items():
            tensors.update({f'{opt}/{i}/{k}': v for k, v in st.items()})
    return s['iter_num'], tensors


def damage(path):
    """Truncate path or flip one of its bits, in place (so a hard link to it is damaged too)."""
    size = os.path.getsize(path)
    if rng.random() < 0.5:
        with open(path, 'r+b') as f:
            f.truncate(rng.randrange(size))
        return 'truncated'
    with open(path, 'r+b') as f:
        at = rng.randrange(size)
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return 'bit flipped'


def torture(name, kills, corrupt):
    """Each process is the restart after the previous kill: its output (read after it is killed in
    turn) says where it resumed, hence how much the previous kill cost. With corrupt, each kill is
    followed by damaging latest, unless no other valid checkpoint would be left (spared): then a
    restart must refuse to start, as train.py does, rather than resume."""
    out = os.path.join(work, name)
    t0 = time.time()
    lost, mid_save, fresh, resumed, pending, spared = [], 0, 0, 0, None, 0
    for k in range(kills + 1):
        had_run = runs.has_run(out)
        p = start(out, args.slow if k < kills else 0.0)
        if k < kills:
            if rng.random() < 0.1:  # during start-up: loading, verifying, trimming the log
                time.sleep(rng.uniform(0.0, 2.0))
            else:  # at a random iteration ahead, and a random moment of it (saves are slow: often mid-save)
                target = reached(out) + rng.randint(1, 4 * CKPT)
                while reached(out) < target and p.poll() is None:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.3))
            if p.poll() is not None and p.returncode != 0:  # a restart that refused to run, or crashed
                raise SystemExit(f"torture: process {k} failed before its kill:\n{p.communicate()[0][-2000:]}")
            # its own scratch dir (that of an earlier killed process stays until the next save clears it)
            mid_save += os.path.isdir(os.path.join(out, f'.ckpt-tmp-{p.pid}'))
            p.send_signal(signal.SIGKILL)
        output = p.communicate()[0]
        if k == kills and p.returncode != 0:
            raise SystemExit(f"torture: the final run failed:\n{output[-2000:]}")
        m = re.search(r'resumed from \S+ at iter (\d+)', output)
        if m:
            resumed += 1
            if pending is not None:
                lost.append(pending - int(m[1]))
            pending = None
        elif 'eval 0:' in output:
            fresh += 1
            assert not had_run, f"process {k} started fresh although {out} held checkpoints"
        if k < kills:
            pending = max(pending or 0, reached(out))
            latest = os.path.join(out, 'latest.safetensors')
            if corrupt and os.path.exists(latest):
                with open(latest, 'rb') as f:
                    intact = f.read()
                damage(latest)
                try:
                    runs.find('resume', out)  # what the restart will resume from
                except Error:  # nothing valid left: train.py would rightly refuse to start
                    with open(latest, 'r+b') as f:
                        f.write(intact)
                    spared += 1
    steps = [json.loads(line)['step'] for line in open(os.path.join(out, 'log.jsonl')) if '"loss"' in line]
    return dict(out=out, lost=lost, mid_save=mid_save, fresh=fresh, resumed=resumed, spared=spared, steps=steps,
                wall=time.time() - t0)


reference = os.path.join(work, 'reference')
subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *COMMON, f'--out_dir={reference}'], check=True,
               stdout=subprocess.DEVNULL, env=ENV)
it_ref, ref = final_state(reference)
mode = 'sync' if args.sync else 'background'
for name, kills, corrupt in (('kills', args.kills, False), ('corrupt', args.corrupt, True)):
    if not kills:
        continue
    r = torture(name, kills, corrupt)
    it, got = final_state(r['out'])
    exact = it == it_ref and got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    once = r['steps'] == list(range(1, ITERS + 1))
    lost = r['lost']
    damaged = f" ({kills - r['spared']} followed by damaging latest, {r['spared']} spared: no other valid file)"
    print(f"{name}: {kills} SIGKILLs{damaged if corrupt else ''} ({mode} saves, {args.slow}s per fsync), "
          f"{r['mid_save']} during a save; {r['resumed']} restarts resumed from a checkpoint, {r['fresh']} started "
          f"fresh before any save existed; iterations lost per kill: max {max(lost) if lost else 0}, "
          f"mean {sum(lost) / max(1, len(lost)):.1f} (ckpt_interval {CKPT}); final weights and optimizer state "
          f"bit-identical to an uninterrupted run: {exact}; log holds each iteration once: {once}; "
          f"{r['wall']:.0f} s", flush=True)
shutil.rmtree(work, ignore_errors=True)
