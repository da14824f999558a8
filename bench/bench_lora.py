"""
Full fine-tuning against LoRA on the config/python_code.py shape (4 layers, 256 wide, block 256,
vocabulary 8192), each a real train.py run from the same base checkpoint, alternated:

    python bench/bench_lora.py                  # 2 rounds of 30 iterations each
    python bench/bench_lora.py --rounds=3 --iters=40
    python bench/bench_lora.py --n_layer=2 --dataset=mine    # any other train.py --key=value, for every run

Reports per mode: trained parameters, AdamW state bytes, checkpoint size, peak RSS (the process's,
from wait4) and tokens/s (median over the rounds, range in brackets), then LoRA's speed-up.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import errors  # noqa: E402
from configurator import script_defaults  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument('--rounds', type=int, default=2)
ap.add_argument('--iters', type=int, default=30)
args, given = ap.parse_known_args()  # the rest goes to train.py, for every run
for name in ('rounds', 'iters'):
    if getattr(args, name) < 1:
        ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
sys.excepthook = errors.report  # an Error (a bad train.py key, say) is one line
CONFIG = os.path.join(ROOT, 'config', 'python_code.py')
QUIET = ['--eval_interval=1000000', '--eval_iters=1', '--ckpt_interval=0', '--rolling_interval=0',
         '--save_best=False', '--save_epochs=False', '--log_interval=5', '--compile=False']
# AdamW in both modes, as when the figures in docs/checkpoints.md were measured: LoRA's adapters train
# on AdamW whatever `optimizer` says, so a full fine-tune on train.py's default (Muon) would compare optimizers
ADAMW = ['--optimizer=adamw']
MODES = {'full fine-tune': [], 'LoRA (rank 8, attn.c_attn + attn.c_proj)': ['--lora_rank=8']}


def train(argv):
    """(peak RSS MB, stdout) of one train.py process."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *argv], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"bench_lora: train.py {' '.join(argv)} failed:\n{out[-2000:]}")
    return usage.ru_maxrss / 1024, out


cfg = script_defaults(os.path.join(ROOT, 'train.py'), [CONFIG, *given])
if (cfg['data_dir'], cfg['dataset']) == ('data', 'stdlib'):  # the default corpus, cached after the first time
    subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py')], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
work = tempfile.mkdtemp(prefix='bench_lora_')
try:
    base = os.path.join(work, 'base')
    train([CONFIG, *ADAMW, *QUIET, *given, f'--out_dir={base}', '--max_iters=1'])  # any weights will do
    base_file = os.path.join(base, 'latest.safetensors')
    results = {m: {'tok_s': [], 'rss': []} for m in MODES}
    for r in range(args.rounds):
        for mode, extra in MODES.items():
            out = os.path.join(work, f'{r}-{len(extra)}')
            rss, stdout = train([CONFIG, *ADAMW, *QUIET, *given, f'--out_dir={out}', f'--init_from={base_file}',
                                 '--reset_state=True', f'--max_iters={args.iters}', *extra])
            log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
            rates = [e['tokens_per_sec'] for e in log if e.get('tokens_per_sec')][1:]  # past the warm-up
            res = results[mode]
            res['tok_s'].append(statistics.median(rates))
            res['rss'].append(rss)
            file = os.path.join(out, 'latest.safetensors')
            state = checkpoint.load(file)
            res['size'] = os.path.getsize(file)
            res['adam'] = sum(t.numel() * t.element_size() for s in state['optimizers']['adamw']['state'].values()
                              for k, t in s.items() if k != 'step')
            line = next(line for line in stdout.splitlines() if 'parameters' in line)
            res['trained'] = line[:line.index(' parameters') + 11] + (line[line.index(' ('):line.index(')') + 1]
                                                                      if ' (' in line.split('tokens/iter')[0] else '')
    for mode, res in results.items():
        med = lambda v: f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})"
        print(f"{mode}: {res['trained']}; AdamW state {res['adam'] / 2**20:.1f} MiB; checkpoint "
              f"{res['size'] / 2**20:.2f} MiB; peak RSS {med(res['rss'])} MB; {med(res['tok_s'])} tokens/s")
    full, lora = (statistics.median(r['tok_s']) for r in results.values())
    sizes = [r['size'] for r in results.values()]
    print(f"LoRA: {lora / full:.2f}x the full fine-tune's tokens/s; its checkpoint is "
          f"{100 * sizes[1] / sizes[0]:.1f}% of the full one's ({os.path.getsize(base_file) / 2**20:.1f} MiB base)")
finally:
    shutil.rmtree(work, ignore_errors=True)
