"""
Training recipes at equal wall time on the same prepared data: nanoGPT's CPU recipe, our old
default, our default (train.py's) and the candidates it was chosen from, each a real train.py run,
two seeds each, scored by the loss over the whole val split (metrics.perplexity, as evaluate.py).
Then the main job: the old default's 2,000 iterations against our default in half of that time,
and our default's own 1,850 iterations (about the same time).

    python prepare.py && python bench/bench_recipe.py     # the study's rows: ~2.5 hours of 2 cores
    python bench/bench_recipe.py --only=nanogpt,default   # some rows (kept in out_dir: rerun to resume)
    python bench/bench_recipe.py --only=probe --scale=0.5 --seeds=1337 --threads=1 --out_dir=out-probe
                                                          # the probe that chose the candidates
    python bench/bench_recipe.py --smoke                  # seconds: a tiny model, a few iterations

Equal time on a shared machine: timings of long runs swing 10-50% with other load, so each recipe's
time per iteration is measured in short alternating rounds (A, B, C, A, B, C, ...) as a ratio to
nanoGPT's recipe in the same round; a row's iterations are its time budget (so many iterations of
a reference recipe) times the reference's time per iteration over its own, medians of the rounds.
The runs then train fixed iteration counts, whose losses do not depend on the load. Timings, runs
and losses are kept in out_dir/results.json, and each run resumes from its checkpoints.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import dataset as ds  # noqa: E402
import errors  # noqa: E402
import metrics  # noqa: E402
from weights import from_state  # noqa: E402

# nanoGPT's CPU recipe (its README's shakespeare_char command: 4x4x128, block 64, batch 12, AdamW lr 1e-3
# cosine to 1e-4 over the run, beta2 0.99, warmup 100), on our model; 3,138 of its iterations took 283 s
NANOGPT = dict(optimizer='adamw', lr_schedule='cosine', block_size=64, batch_size=12, learning_rate=1e-3,
               min_lr=1e-4, beta2=0.99, warmup_iters=100, weight_decay=0.1)
OLD = dict(optimizer='adamw', lr_schedule='cosine', block_size=128, batch_size=16, learning_rate=2e-3,
           min_lr=2e-4, beta2=0.99, warmup_iters=100, weight_decay=0.1)  # train.py's defaults until this study
MUON = dict(OLD, optimizer='muon', lr_schedule='wsd', decay_frac=0.4, min_lr=0.0, warmup_iters=20)
EQUAL, MAIN = ('nanogpt', 3138), ('old', 2000)  # time budgets: iterations of a recipe
ROWS = {  # name: (what it is, train.py settings ({}: train.py's defaults), time budget)
    'nanogpt': ("nanoGPT's CPU recipe", NANOGPT, EQUAL),
    'old': ("our old default: AdamW 2e-3 cosine, block 128, batch 16", OLD, EQUAL),
    'default': ("our default (train.py): Muon lr 8e-3, wsd 0.4 to 0, warmup 20, block 128, batch 16", {}, EQUAL),
    'muon': ("Muon, lr 2e-3, wsd 0.4 to 0, warmup 20", MUON, EQUAL),
    'muon-lr4': ("Muon, lr 4e-3", dict(MUON, learning_rate=4e-3), EQUAL),
    'muon-lr8': ("Muon, lr 8e-3", dict(MUON, learning_rate=8e-3), EQUAL),
    'muon-cos': ("Muon, cosine to 2e-4", dict(MUON, lr_schedule='cosine', min_lr=2e-4), EQUAL),
    'muon-b8': ("Muon, batch 8", dict(MUON, batch_size=8), EQUAL),
    'muon-t64': ("Muon, block 64, batch 24", dict(MUON, block_size=64, batch_size=24), EQUAL),
    'muon-w100': ("Muon, warmup 100", dict(MUON, warmup_iters=100), EQUAL),
    'p-lr8-b8': ("Muon, lr 8e-3, batch 8", dict(MUON, learning_rate=8e-3, batch_size=8), EQUAL),
    'p-lr4-b8': ("Muon, lr 4e-3, batch 8", dict(MUON, learning_rate=4e-3, batch_size=8), EQUAL),
    'p-lr16': ("Muon, lr 1.6e-2", dict(MUON, learning_rate=1.6e-2), EQUAL),
    'p-adamw-lr4': ("AdamW, lr 4e-3, wsd 0.4 to 0, warmup 20", dict(MUON, optimizer='adamw', learning_rate=4e-3), EQUAL),
    'default-b4': ("our default with batch 4", dict(batch_size=4), EQUAL),
    'default-b8': ("our default with batch 8", dict(batch_size=8), EQUAL),
    'default-b32': ("our default with batch 32", dict(batch_size=32), EQUAL),
    'old-main': ("the main job until now: old default, 2,000 iterations", OLD, MAIN),
    'default-half': ("our default in half of that time", {}, (MAIN[0], MAIN[1] // 2)),
    'default-main': ("our default: the main job, 1,850 iterations", {}, ('default', 1850)),
}
STUDY = ('nanogpt', 'old', 'default', 'default-b4', 'default-b8', 'default-b32', 'old-main', 'default-half', 'default-main')
PROBE = ('nanogpt', 'old', 'muon', 'muon-lr4', 'muon-lr8', 'p-lr16', 'muon-cos', 'muon-w100', 'muon-t64', 'muon-b8',
         'p-lr4-b8', 'p-lr8-b8', 'p-adamw-lr4')
RECIPES = {'nanogpt': NANOGPT, 'old': OLD, 'default': {}}  # the references of the time budgets
SPEED = ('optimizer', 'block_size', 'batch_size', 'gradient_accumulation_steps', 'n_layer', 'n_head', 'n_embd')
QUIET = ['--eval_interval=100000000', '--ckpt_interval=200', '--rolling_interval=0', '--save_best=False',
         '--save_epochs=False', '--compile=False', '--device=cpu', '--dtype=float32']
TINY = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--eval_iters=2']  # --smoke

ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
ap.add_argument('--only', help="comma-separated row names, or 'probe' (default: the study's rows; --smoke: two)")
ap.add_argument('--scale', type=float, default=1.0, help='every time budget times this')
ap.add_argument('--seeds', default='1337,1338')
ap.add_argument('--rounds', type=int, default=5, help='alternating timing rounds')
ap.add_argument('--timing_iters', type=int, default=30, help='iterations of a timing run')
ap.add_argument('--threads', type=int, default=2, help='OMP_NUM_THREADS of the timing runs and the scoring')
ap.add_argument('--jobs', type=int, default=1, help='training runs at a time, each on threads / jobs threads '
                '(losses do not depend on it; on a loaded machine 1-thread runs waste less in spin-waits)')
ap.add_argument('--data_dir', default=os.path.join(ROOT, 'data'))
ap.add_argument('--dataset', default='stdlib')
ap.add_argument('--out_dir', default=os.path.join(ROOT, 'out-recipe'))
ap.add_argument('--smoke', action='store_true', help='a tiny model, 1 round, 1 seed, a few iterations')
args = ap.parse_args()
for name in ('rounds', 'timing_iters', 'threads', 'jobs'):
    if getattr(args, name) < 1:
        ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
if not 0 < args.scale < float('inf'):
    ap.error(f"--scale must be a positive number, got {args.scale}")
if not all(s.isdigit() for s in args.seeds.split(',')):
    ap.error(f"--seeds takes comma-separated whole numbers, got {args.seeds!r}")
sys.excepthook = errors.report  # an Error is one line
# train.py runs in the repository: folders named relative to where this was started
args.data_dir, args.out_dir = os.path.abspath(args.data_dir), os.path.abspath(args.out_dir)
if args.smoke:
    args.scale, args.rounds, args.timing_iters, args.seeds = 4 / 1000, 1, 6, args.seeds.split(',')[0]
if args.only is None:
    args.only = 'nanogpt,default' if args.smoke else ','.join(STUDY)
args.only = ','.join(PROBE) if args.only == 'probe' else args.only
names = [n for n in ROWS if n in args.only.split(',')]
unknown = set(args.only.split(',')) - set(ROWS) - {''}
if unknown or not names:
    ap.error(f"--only takes rows among {','.join(ROWS)} (or 'probe'), got {args.only!r}")
seeds = [int(s) for s in args.seeds.split(',')]
env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads), 'PYTHONUNBUFFERED': '1'}
train_env = {**env, 'OMP_NUM_THREADS': str(max(1, args.threads // args.jobs))}
torch.set_num_threads(args.threads)
os.makedirs(args.out_dir, exist_ok=True)
results_path = os.path.join(args.out_dir, 'results.json')
results = json.load(open(results_path)) if os.path.exists(results_path) else {'timing': {}, 'runs': {}}
setup = {'smoke': args.smoke, 'threads': args.threads, 'dataset': args.dataset}
if results.setdefault('setup', setup) != setup:
    raise SystemExit(f"bench_recipe: error: {results_path} holds results of other settings "
                     f"({results['setup']}); use another --out_dir")


def save():
    with open(results_path + '.tmp', 'w') as f:
        json.dump(results, f, indent=1)
    os.replace(results_path + '.tmp', results_path)


def start(out, settings, extra, env=env):
    """A train.py process (the same command resumes an interrupted run)."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *QUIET, f'--data_dir={args.data_dir}',
           f'--dataset={args.dataset}', f'--out_dir={out}', *[f'--{k}={v}' for k, v in settings.items()],
           *(TINY if args.smoke else []), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(p, out):
    """Wait for a train.py process; returns its log."""
    _, stderr = p.communicate()
    if p.returncode:
        raise SystemExit(f"bench_recipe: error: train.py failed:\n{' '.join(p.args)}\n{stderr.strip()[-1500:]}")
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


def speed_class(settings):
    """Recipes alike in what sets the time of an iteration share a timing; train.py's defaults ({}) are one."""
    key = {k: settings[k] for k in SPEED if k in settings}
    return json.dumps(key) if key else 'default'


# -----------------------------------------------------------------------------
# timing: ms per iteration of each speed class in alternating rounds, as medians of ratios to nanoGPT's
classes = {speed_class(RECIPES['nanogpt']): RECIPES['nanogpt']}
for name in names:
    for settings in (ROWS[name][1], RECIPES[ROWS[name][2][0]]):
        classes.setdefault(speed_class(settings), settings)
todo = [c for c in classes if c not in results['timing']]
if todo:
    ref = speed_class(RECIPES['nanogpt'])
    ms = {c: [] for c in [ref] + [c for c in todo if c != ref]}
    for r in range(args.rounds):
        for c in ms:
            out = os.path.join(args.out_dir, 'timing')
            shutil.rmtree(out, ignore_errors=True)  # a new run each time
            log = finish(start(out, classes[c], [f'--max_iters={args.timing_iters}', '--log_interval=5',
                                                 '--eval_iters=1']), out)
            ms[c].append(statistics.median([e['ms_per_iter'] for e in log if e.get('ms_per_iter')][1:]))
        print(f"timing round {r + 1}/{args.rounds}: " + ', '.join(f"{c} {v[-1]:.0f} ms" for c, v in ms.items()),
              flush=True)
    for c in todo:
        ratios = [t / t_ref for t, t_ref in zip(ms[c], ms[ref])]
        results['timing'][c] = {'ms': ms[c], 'ratio': statistics.median(ratios), 'range': [min(ratios), max(ratios)]}
    save()


def ratio(settings):
    return results['timing'][speed_class(settings)]['ratio']


def iterations(name):
    """A row's time budget in its own iterations."""
    _, settings, (ref, n) = ROWS[name]
    return max(1, round(args.scale * n * ratio(RECIPES[ref]) / ratio(settings)))


# -----------------------------------------------------------------------------
# training: every row for its iterations, then its loss over the whole val split
val = ds.open_split(os.path.join(args.data_dir, args.dataset), 'val')


def score(run):
    """The loss over the whole val split of a finished run's final checkpoint, kept in results.json."""
    name, seed, out, p, t0 = run
    log = finish(p, out)
    state = checkpoint.load(os.path.join(out, 'latest.safetensors'))
    with torch.no_grad():
        loss = metrics.perplexity(from_state(state).eval(), val, ds.load_tokenizer(state['tokenizer']))['loss']
    results['runs'][os.path.basename(out)] = {'name': name, 'seed': seed, 'iters': state['iter_num'], 'val_loss': loss,
                                              'train_val_loss': [e for e in log if 'val_loss' in e][-1]['val_loss'],
                                              'seconds': time.time() - t0}
    save()
    print(f"{os.path.basename(out)}: whole-val loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)


running = []
for name in names:
    for seed in seeds:
        key = f'{name}-s{seed}-i{iterations(name)}'
        if key in results['runs']:
            continue
        if len(running) == args.jobs:
            score(running.pop(0))
        out = os.path.join(args.out_dir, key)
        running.append((name, seed, out, start(out, ROWS[name][1], [f'--max_iters={iterations(name)}', f'--seed={seed}',
                                                                    '--log_interval=50'], env=train_env), time.time()))
for run in running:
    score(run)

# -----------------------------------------------------------------------------
# one table: rows compare to the first row whose budget counts the same recipe's iterations
print(f"\nloss over the whole val split of {args.dataset} (nats/token), seeds {', '.join(map(str, seeds))}; time per "
      f"iteration against nanoGPT's recipe: median [range] of {len(results['timing'][speed_class(NANOGPT)]['ms'])} alternating rounds, {args.threads} threads\n")
print("| row | recipe | time budget | time/iter | iterations | val loss per seed | mean | difference |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
first = {}
for name in names:
    what, settings, (ref, n) = ROWS[name]
    runs = [results['runs'].get(f'{name}-s{s}-i{iterations(name)}') for s in seeds]
    losses = [r['val_loss'] for r in runs if r]
    if not losses:
        continue
    mean = statistics.mean(losses)
    base = first.setdefault(ref, (name, mean))
    timing = results['timing'][speed_class(settings)]
    print(f"| {name} | {what} | {round(args.scale * n):,} x {ref} | {timing['ratio']:.2f} [{timing['range'][0]:.2f}-"
          f"{timing['range'][1]:.2f}] | {iterations(name):,} | {', '.join(f'{x:.3f}' for x in losses)} | {mean:.3f} | "
          f"{'' if base[0] == name else f'{mean - base[1]:+.3f} vs {base[0]}'} |")
