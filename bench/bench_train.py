"""
Training throughput and MFU of a config against this machine's measured float32 matmul peak,
with and without torch.compile, and where the time of one iteration goes:

    python bench/bench_train.py config/python_code.py
    python bench/bench_train.py --iters=30 --compile=off          # the default config, eager only
    python bench/bench_train.py --compile=off --batch_size=8 --dataset=mine   # any train.py --key=value

Each measurement is a real `train.py` run (evals and checkpoints off) whose log.jsonl gives
tokens/s after the first two logged intervals (warm-up, and compilation when on). Other --key=value
arguments go to train.py (and to the profile's model); the default corpus is prepared when used.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import errors  # noqa: E402
import hardware  # noqa: E402
from configurator import script_defaults  # noqa: E402
from model import GPT, GPTConfig, pad_vocab  # noqa: E402
from optim import configure_optimizers  # noqa: E402

QUIET = ['--eval_interval=1000000', '--ckpt_interval=0', '--rolling_interval=0', '--save_best=False',
         '--save_epochs=False', '--log_interval=5']


def throughput(config, given, iters, compile, peak):
    """(tokens/s, MFU %) of one train.py run: the config file, QUIET, then the user's --key=value."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *config, *QUIET, *given,
               f'--out_dir={out}', f'--max_iters={iters}', f'--compile={compile}', f'--peak_flops={peak}']
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"bench_train: train.py failed: {p.stderr.strip()[-500:]}")
        log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    steady = [e for e in log if e.get('tokens_per_sec')][2:]  # past warm-up / compilation
    if not steady:
        raise SystemExit(f"bench_train: --iters={iters} logs no rate past the warm-up intervals; give at least "
                         f"4 log intervals of iterations")
    return sum(e['tokens_per_sec'] for e in steady) / len(steady), sum(e['mfu'] for e in steady) / len(steady)


def build(cfg, vocab_size):
    """The model train.py builds from scratch for this config."""
    return GPT(GPTConfig(n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_embd=cfg['n_embd'], bias=cfg['bias'],
                         block_size=cfg['block_size'], vocab_size=vocab_size, padded_vocab_size=pad_vocab(vocab_size)))


def profile(cfg, vocab_size, steps=3):
    """Top ops of a few eager training steps, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    model = build(cfg, vocab_size)
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), 'cpu')['adamw']
    x = torch.randint(0, vocab_size, (cfg['batch_size'], cfg['block_size']))

    def step():
        _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("where an eager iteration's time goes (self CPU time):")
    for e in events[:10]:
        print(f"  {e.key:<45} {100 * e.self_cpu_time_total / total:5.1f}%")


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('config', nargs='?', default=None)
    ap.add_argument('--iters', type=int, default=40)
    ap.add_argument('--compile', choices=['both', 'on', 'off'], default='both')
    args, given = ap.parse_known_args()  # the rest goes to train.py
    if args.iters < 1:
        ap.error(f"--iters must be at least 1, got {args.iters}")
    sys.excepthook = errors.report  # an Error (a bad train.py key, say) is one line
    config = [os.path.abspath(args.config)] if args.config else []  # train.py runs in ROOT
    cfg = script_defaults(os.path.join(ROOT, 'train.py'), [*config, *given])
    if (cfg['data_dir'], cfg['dataset']) == ('data', 'stdlib'):  # the default corpus, cached after the first time
        subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py')], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    meta = json.load(open(os.path.join(ROOT, cfg['data_dir'], cfg['dataset'], 'meta.json')))
    # measures, and keeps the best in the cache train.py reads; --peak_flops=F: MFU against F instead
    peak = cfg['peak_flops'] or hardware.cpu_peak_flops(measure=True)
    source = 'given' if cfg['peak_flops'] else 'measured'
    model = build(cfg, meta['tokenizer']['vocab_size'])
    print(f"{' '.join([args.config or 'default config', *given])}: {model.num_params() / 1e6:.2f}M params, "
          f"{model.flops_per_token() / 1e6:.1f} MFLOP/token; {source} float32 matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"on {torch.get_num_threads()} threads")
    rates = {}
    for compile in {'both': (False, True), 'on': (True,), 'off': (False,)}[args.compile]:
        tok_s, mfu = throughput(config, given, args.iters, compile, peak)
        rates[compile] = tok_s
        print(f"compile={compile}: {tok_s:,.0f} tokens/s, MFU {mfu:.1f}% of the {source} peak")
    # the peak again after the runs, in case other work on the machine disturbed the first measurement
    peak_after = peak if cfg['peak_flops'] else hardware.cpu_peak_flops(measure=True)
    if peak_after > peak:
        print(f"measured peak after the runs: {peak_after / 1e9:.0f} GFLOP/s; MFU against it: " + ", ".join(
            f"compile={c} {100 * r * model.flops_per_token() / peak_after:.1f}%" for c, r in rates.items()))
    if len(rates) == 2:
        print(f"compile speed-up: {rates[True] / rates[False]:.2f}x")
    profile(cfg, meta['tokenizer']['vocab_size'])
