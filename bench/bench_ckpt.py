"""
What a checkpoint save costs training, synchronous against in the background (checkpoint.Writer),
for the states train.py saves (model + AdamW, built here, no training needed):

    python bench/bench_ckpt.py                       # default config, python_code, GPT-2 small
    python bench/bench_ckpt.py --states=gpt2_medium --rounds=2
    python bench/bench_ckpt.py --resume_rss          # + peak RSS of train.py resuming a GPT-2-small state
    python bench/bench_ckpt.py --states=default --rounds=1 --dir=/tmp   # quick; another disk

For each state: the seconds training is blocked per save, sync and background alternated for
--rounds rounds (median and range; the first background save also pays for its buffers, reported
apart), and the overhead as a share of training time at the config's ckpt_interval. Iteration
times: measured on this machine for the CPU configs; for slm / gpt2_medium estimated from their
GPU setup (stated), since this machine has no GPU. Writes into a temporary folder inside --dir
(default: the repository, on the disk that out/ checkpoints go to).
"""
import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import errors  # noqa: E402
import runs  # noqa: E402
from configurator import script_defaults  # noqa: E402
from model import GPT, GPTConfig, pad_vocab  # noqa: E402
from optim import configure_optimizers  # noqa: E402

sys.excepthook = errors.report  # an Error is one line

# name: (config file, vocabulary, estimated seconds per iteration on a GPU setup or None: measure here)
STATES = {
    'default': (None, 8192, None),
    'python_code': ('config/python_code.py', 8192, None),
    # 491,520 tokens/iter x 0.86 GFLOP/token on 4 A100s (312 TFLOP/s) at 40% MFU: 0.85 s/iter
    'slm': ('config/slm.py', 50257, 491520 * 0.857e9 / (4 * 312e12 * 0.40)),
    # 524,288 tokens/iter x 2.43 GFLOP/token on 8 A100s at 40% MFU: 1.28 s/iter
    'gpt2_medium': ('config/gpt2_medium.py', 50257, 524288 * 2.43e9 / (8 * 312e12 * 0.40)),
}


def build(name):
    """(train.py-shaped state, config, measured seconds per iteration or None)."""
    cfg_file, vocab, _ = STATES[name]
    cfg = script_defaults(os.path.join(ROOT, 'train.py'), [os.path.join(ROOT, cfg_file)] if cfg_file else [])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_embd=cfg['n_embd'], vocab_size=vocab,
                          block_size=cfg['block_size'], padded_vocab_size=pad_vocab(vocab)))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), 'cpu')['adamw']
    sec_per_iter = None
    if STATES[name][2] is None:  # a few real steps at the config's batch: its iteration time here
        x = torch.randint(0, vocab, (cfg['batch_size'], cfg['block_size']))
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            model(x, x)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        sec_per_iter = statistics.median(times[1:]) * cfg['gradient_accumulation_steps']
    else:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # AdamW's moments exist, as in any checkpoint after the first iteration
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'iter_num': 1, 'config': cfg,
             'rng': runs.rng_state(), 'time': time.time()}
    return state, cfg, sec_per_iter


def blocked(writer, out, state):
    with contextlib.redirect_stdout(io.StringIO()):  # the writer's own "saved ..." line
        t0 = time.perf_counter()
        writer.save(out, state, ['latest'])
        b = time.perf_counter() - t0
        writer.wait()
    return b, time.perf_counter() - t0


def bench_state(name, rounds, folder):
    state, cfg, measured = build(name)
    size = sum(t.numel() * t.element_size() for t in state['model'].values()) + sum(
        t.numel() * t.element_size() for s in state['optimizer']['state'].values() for t in s.values())
    out = tempfile.mkdtemp(prefix='bench_ckpt_', dir=folder)
    sync, background = checkpoint.Writer(background=False), checkpoint.Writer()
    try:
        first = blocked(background, out, state)  # allocates and first touches the snapshot buffers
        s, a, a_total = [], [], []
        for _ in range(rounds):
            s.append(blocked(sync, out, state)[0])
            b, total = blocked(background, out, state)
            a.append(b)
            a_total.append(total)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    per_iter = measured or STATES[name][2]
    every = cfg['ckpt_interval'] * per_iter
    rng = lambda v: f"{statistics.median(v):.3f} s ({min(v):.3f}-{max(v):.3f})"
    print(f"{name}: state {size / 1e9:.2f} GB; blocked per save: sync {rng(s)}, background {rng(a)} "
          f"(write {statistics.median(a_total):.2f} s in the background; first background save {first[0]:.2f} s, "
          f"buffers included)", flush=True)
    how = 'measured here' if measured else 'estimated for its GPUs (see STATES)'
    print(f"  ckpt_interval {cfg['ckpt_interval']} x {per_iter:.3f} s/iter ({how}) = a save every {every:.0f} s: "
          f"overhead sync {100 * statistics.median(s) / every:.2f}%, background "
          f"{100 * statistics.median(a) / every:.3f}% (blocked times measured on this CPU)", flush=True)


def resume_rss(folder):
    """Peak RSS of train.py on a GPT-2-small-size model: a fresh start against a resume of its state."""
    subprocess.run([sys.executable, 'prepare.py', '--tokenizer=bpe', '--vocab_size=50257',
                    '--dataset=stdlib_bpe50k'], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    out = tempfile.mkdtemp(prefix='bench_rss_', dir=folder)
    common = ['--dataset=stdlib_bpe50k', '--n_layer=12', '--n_head=12', '--n_embd=768', '--block_size=1024',
              '--batch_size=1', '--eval_iters=1', '--eval_interval=1000', '--rolling_interval=0',
              '--save_epochs=False', '--save_best=False', f'--out_dir={out}']
    peaks = []
    try:
        for extra in (['--max_iters=2'], ['--max_iters=4']):  # the second run resumes the first
            p = subprocess.Popen([sys.executable, 'train.py', *common, *extra], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(p.pid, 0)
            if os.waitstatus_to_exitcode(status):
                raise SystemExit(f"bench_ckpt: train.py failed: {p.stderr.read().decode()[-500:]}")
            peaks.append(usage.ru_maxrss / 1024)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"GPT-2-small-size state: peak RSS fresh start {peaks[0]:.0f} MB, resume {peaks[1]:.0f} MB "
          f"({peaks[1] / peaks[0]:.2f}x)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--states', default='default,python_code,slm')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--resume_rss', action='store_true')
    ap.add_argument('--dir', default=ROOT, help='where the checkpoints are written (a temporary folder inside it)')
    args = ap.parse_args()
    names = [s for s in args.states.split(',') if s]
    if not names or set(names) - set(STATES):
        ap.error(f"--states takes names among {','.join(STATES)}, got {args.states!r}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; {torch.get_num_threads()} threads")
    if args.resume_rss:  # first: a child's peak RSS counts what it shares with this process before exec
        resume_rss(args.dir)
    for name in names:
        bench_state(name, args.rounds, args.dir)
