"""
Teaching a model to answer, measured: the loss on the answers only against the loss on every token,
and replay of the base corpus against forgetting it, at equal compute (the same iterations, batch
and windows), each a real train.py run from one base model pretrained on the stdlib:

    python prepare.py && python bench/bench_sft.py            # ~25 min on 2 cores
    python bench/bench_sft.py --seeds=1337,1338 --iters=300 --replay=0,0.1,0.3
    python bench/bench_sft.py --smoke --data_dir=D --dataset=tiny   # seconds: the path, not figures

The task, made from the base corpus's own files: three consecutive lines of Python, one of them a
`def`, and the question which function they define; the answer is its name. Pairs from a hash of
the file go to training, the rest are held out, so a held-out answer is a name the fine-tune never
saw. Per run: the answers' loss and greedy exact match on the held-out pairs (evaluate.py --qa, the
same numbers for every run whatever it trained on) and the base corpus's val loss (train.py's
eval_datasets, or its mixture's own val loss for it), with the base model's before them.
"""
import argparse
import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dataset as ds  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
ap.add_argument('--data_dir', default=os.path.join(ROOT, 'data'))
ap.add_argument('--dataset', default='stdlib', help='the base corpus (prepared; its files make the task)')
ap.add_argument('--base_iters', type=int, default=600, help='pretraining of the base model')
ap.add_argument('--iters', type=int, default=300, help='each fine-tune')
ap.add_argument('--seeds', default='1337,1338')
ap.add_argument('--replay', default='0,0.1,0.3', help="the base corpus's shares of the fine-tune's data")
ap.add_argument('--learning_rate', type=float, default=2e-3)
ap.add_argument('--pairs', type=int, default=4000, help='question/answer pairs made, at most')
ap.add_argument('--out_dir', default=os.path.join(ROOT, 'out-sft'))
ap.add_argument('--smoke', action='store_true', help='a tiny model, a few iterations, one seed')
args = ap.parse_args()
for name in ('base_iters', 'iters', 'pairs'):
    if getattr(args, name) < 1:
        ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
if not args.learning_rate > 0:
    ap.error(f"--learning_rate must be a positive number, got {args.learning_rate}")
try:
    seeds = [int(s) for s in args.seeds.split(',')][:1 if args.smoke else None]
    replays = [float(r) for r in args.replay.split(',')]
except ValueError:
    ap.error(f"--seeds takes comma-separated whole numbers and --replay shares, got "
             f"{args.seeds!r} and {args.replay!r}")
if not all(0 <= r < 1 for r in replays):
    ap.error(f"--replay takes comma-separated shares from 0 up to (not including) 1, got {args.replay!r}")
MODEL = (['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=64', '--batch_size=4', '--eval_iters=2']
         if args.smoke else [])  # train.py's defaults otherwise: the Quick start's model
QUIET = ['--compile=False', '--log_interval=50', '--ckpt_interval=0', '--rolling_interval=0',
         '--save_epochs=False', f'--data_dir={args.data_dir}']
env = {**os.environ, 'PYTHONUNBUFFERED': '1'}


def run(script, *argv):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"bench_sft.py: error: {script} {' '.join(argv)} failed:\n{p.stderr.strip()[-1500:]}")
    return p.stdout


def make_pairs(corpus, limit):
    """(train, held-out) pairs from the base corpus's own documents (decoded from its splits)."""
    tok = ds.load_tokenizer(ds.tokenizer_state(corpus))
    pairs = ([], [])
    for split in ds.SPLITS:
        ids = ds.open_split(corpus, split)
        text = tok.decode(ids[:min(len(ids), 3_000_000)])
        for doc in text.split('<|endoftext|>'):
            lines = [line.rstrip() for line in doc.split('\n') if line.strip()]
            held = int(hashlib.sha256(doc[:200].encode()).hexdigest(), 16) % 5 == 0
            for i in range(len(lines) - 2):
                defs = [re.match(r'\s*def (\w+)\(', line) for line in lines[i:i + 3]]
                if sum(bool(d) for d in defs) == 1 and max(len(x) for x in lines[i:i + 3]) < 80:
                    name = next(d[1] for d in defs if d)
                    prompt = '\n'.join(lines[i:i + 3]) + '\nQ: which function do these lines define?\nA:'
                    pairs[held].append({'prompt': prompt, 'completion': f' {name}'})
    random.Random(0).shuffle(pairs[0])
    random.Random(1).shuffle(pairs[1])
    return pairs[0][:limit], pairs[1][:max(20, limit // 10)]


def last_eval(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f if '"val_loss"' in line][-1]


def score(ckpt, qa_file, work):
    """evaluate.py --qa of a checkpoint: (answer loss, exact match)."""
    path = os.path.join(work, 'eval.json')
    if os.path.exists(path):
        os.remove(path)
    run('evaluate.py', f'--ckpt={ckpt}', f'--qa={qa_file}', '--split=', '--generate=False',
        '--qa_max_new_tokens=12', f'--json={path}')
    with open(path) as f:
        qa = json.load(f)['checkpoints'][0]['qa']
    return qa['loss'], qa['exact_match']


os.makedirs(args.out_dir, exist_ok=True)
work = tempfile.mkdtemp(prefix='bench_sft_', dir=args.out_dir)
corpus = os.path.join(args.data_dir, args.dataset)
train_pairs, held = make_pairs(corpus, args.pairs)
held = held[:5] if args.smoke else held
if len(train_pairs) < 20 or len(held) < 5:
    sys.exit(f"bench_sft.py: error: {corpus} holds too few `def` lines for the task "
             f"({len(train_pairs)} training pairs, {len(held)} held out)")
for name, pairs in (('qa_train.jsonl', train_pairs), ('qa_held.jsonl', held)):
    with open(os.path.join(work, name), 'w') as f:
        f.write(''.join(json.dumps(p) + '\n' for p in pairs))
qa_name = f'bench_sft_{args.dataset}'
run('prepare.py', f'--input={work}/qa_train.jsonl', f'--tokenizer={corpus}/tokenizer.json'
    if os.path.exists(f'{corpus}/tokenizer.json') else f"--tokenizer={ds.read_meta(corpus)['tokenizer']['kind']}",
    f'--data_dir={args.data_dir}', f'--dataset={qa_name}', '--min_split_tokens=65')
held_file = os.path.join(work, 'qa_held.jsonl')
print(f"task: {len(train_pairs)} training pairs, {len(held)} held out, from {corpus}")

base = os.path.join(work, 'base')
run('train.py', *MODEL, *QUIET, f'--dataset={args.dataset}', f'--out_dir={base}',
    f'--max_iters={2 if args.smoke else args.base_iters}')
base_loss, base_em = score(os.path.join(base, 'latest.safetensors'), held_file, work)
print(f"base ({2 if args.smoke else args.base_iters} iters on {args.dataset}): {args.dataset} val loss "
      f"{last_eval(base)['val_loss']:.4f}; held-out answer loss {base_loss:.4f}, exact match {base_em:.3f}")

rows = []  # (condition, seed, answer loss, exact match, base corpus val loss)
conditions = [('answers only', 'flagged', 0.0), ('all tokens', 'all', 0.0)]
conditions += [(f'replay {r:.0%}', 'flagged', r) for r in replays if r > 0]
for seed in seeds:
    for label, tokens, replay in conditions:
        out = os.path.join(work, f"{label.replace(' ', '_').replace('%', '')}-{seed}")
        mix = f'{qa_name}:{1 - replay:g},{args.dataset}:{replay:g}' if replay else qa_name
        watch = [] if replay else [f'--eval_datasets={args.dataset}']
        run('train.py', *MODEL, *QUIET, f'--dataset={mix}', *watch, f'--loss_tokens={tokens}',
            f'--init_from={base}/latest.safetensors', '--reset_state=True', f'--out_dir={out}',
            f'--max_iters={4 if args.smoke else args.iters}', f'--learning_rate={args.learning_rate}',
            '--warmup_iters=10', f'--seed={seed}', f'--eval_interval={args.iters}')
        loss, em = score(os.path.join(out, 'latest.safetensors'), held_file, work)
        forgot = last_eval(out)[f'val_loss/{args.dataset}']
        rows.append((label, seed, loss, em, forgot))
        print(f"{label}, seed {seed}: held-out answer loss {loss:.4f}, exact match {em:.3f}; "
              f"{args.dataset} val loss {forgot:.4f}", flush=True)

print(f"\n| condition | answer loss (held out) | exact match | {args.dataset} val loss (base "
      f"{last_eval(base)['val_loss']:.3f}) |\n| --- | --- | --- | --- |")
for label, _, _ in conditions:
    got = [r for r in rows if r[0] == label]
    cell = lambda k, f: (f"{statistics.mean(r[k] for r in got):{f}} ("
                         + ", ".join(f"{r[k]:{f}}" for r in got) + ")")
    print(f"| {label} | {cell(2, '.4f')} | {cell(3, '.3f')} | {cell(4, '.4f')} |")
