"""
Throughput figures for the whole pipeline, measured in one run on this machine:

    python bench/bench.py                      # prepare, train, checkpoint, sample
    python bench/bench.py --only=sample,train
    python bench/bench.py --only=train --iters=20 --dataset=mine --batch_size=8   # --key=value: to train.py

prepare: bench/bench_prepare.py on the default corpus (MB/s, tokens/s, peak memory).
train: tokens/s of the default config (60 iterations) and of config/python_code.py (30), and what a
    checkpoint costs (its write time, and that as a share of training time at the config's
    ckpt_interval if saved synchronously; bench/bench_ckpt.py measures background saves). Other
    --key=value arguments go to both train.py runs; the default corpus is prepared when used.
sample: 500 new tokens at block size 256 with the KV cache versus recomputing the full context.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import errors  # noqa: E402
from configurator import script_defaults  # noqa: E402

sys.excepthook = errors.report  # an Error (a bad train.py key, say) is one line
SECTIONS = ('prepare', 'train', 'sample')


def bench_prepare():
    subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench_prepare.py')], check=True)


def bench_train(name, config, given, iters):
    """Run train.py (a config file or none, then the user's --key=value) for `iters` iterations;
    report steady tokens/s and checkpoint cost."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *config, '--eval_interval=1000000', '--log_interval=5',
               *given, f'--out_dir={out}', f'--max_iters={iters}']
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"bench: train.py failed: {p.stderr.strip()}")
        log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
        steady = [e for e in log if e.get('tokens_per_sec')][2:]  # skip warm-up intervals
        if not steady:
            raise SystemExit(f"bench: --iters={iters} logs no rate past the warm-up intervals; give at least "
                             f"4 log intervals of iterations")
        ms = sum(e['ms_per_iter'] for e in steady) / len(steady)
        tok_s = sum(e['tokens_per_sec'] for e in steady) / len(steady)
        # "saved NAMES [in the background] in 0.04s; ...": the write itself
        saves = [float(t) for t in re.findall(r'saved .* in ([0-9.]+)s;', p.stdout)]
        size = os.path.getsize(os.path.join(out, 'latest.safetensors')) / 2**20
    ckpt_interval = script_defaults(os.path.join(ROOT, 'train.py'), [*config, *given])['ckpt_interval']
    save_s = max(saves) if saves else float('nan')
    overhead = save_s / (ckpt_interval * ms / 1000) * 100
    print(f"train {name}: {tok_s:,.0f} tokens/s, {ms:.1f} ms/iter; checkpoint {size:.1f} MB written in "
          f"{save_s * 1000:.0f} ms, every {ckpt_interval} iters = {overhead:.2f}% of training time if synchronous")


def bench_sample(new_tokens):
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=8192)).eval()
    prompt = torch.randint(0, 8192, (1, 8))
    rates = {}
    for use_cache in (True, False):
        model.generate(prompt, 20, use_cache=use_cache)  # warm-up
        times = []
        for _ in range(3):  # best of 3: the least disturbed by other work on the machine
            t0 = time.time()
            model.generate(prompt, new_tokens, use_cache=use_cache, generator=torch.Generator().manual_seed(0))
            times.append(time.time() - t0)
        rates[use_cache] = new_tokens / min(times)
    print(f"sample: {new_tokens} new tokens at block 256 (4x4x256, vocab 8192): KV cache {rates[True]:.0f} tok/s, "
          f"full recompute {rates[False]:.0f} tok/s, ratio {rates[True] / rates[False]:.1f}x")


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--only', default=','.join(SECTIONS))
    ap.add_argument('--iters', type=int, help='iterations of each train run (default: 60, and 30 for python_code)')
    ap.add_argument('--new_tokens', type=int, default=500, help='tokens each sample run generates')
    args, given = ap.parse_known_args()  # the rest goes to train.py
    only = [s for s in args.only.split(',') if s]
    if not only or set(only) - set(SECTIONS):
        ap.error(f"--only takes sections among {','.join(SECTIONS)}, got {args.only!r}")
    for name in ('iters', 'new_tokens'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    if 'prepare' in only:
        bench_prepare()
    if 'train' in only:
        cfg = script_defaults(os.path.join(ROOT, 'train.py'), given)
        if (cfg['data_dir'], cfg['dataset']) == ('data', 'stdlib'):  # the default corpus, cached after the first time
            subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py')], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        bench_train('default config', [], given, args.iters or 60)
        bench_train('config/python_code.py', [os.path.join(ROOT, 'config', 'python_code.py')], given, args.iters or 30)
    if 'sample' in only:
        bench_sample(args.new_tokens)
