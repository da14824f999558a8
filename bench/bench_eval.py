"""
Multiple-choice scoring throughput (items/s): metrics.score_mcq batched against one forward per
choice (batch_size=1), on the default model, alternating in one run so load on a shared machine
hits both alike:

    python prepare.py && python bench/bench_eval.py            # the default model, random weights
    python bench/bench_eval.py --ckpt=out/latest.safetensors   # a trained one
    python bench/bench_eval.py --items=600 --rounds=5 --batch_sizes=16,64

Items are made from the stdlib val split: a source line as the question and 4 other lines, cut to
60 characters and distinct, as choices, so prompt and choice lengths are those of real code (about
30 and 10 tokens).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dataset as ds  # noqa: E402
import errors  # noqa: E402
import metrics  # noqa: E402
import runs  # noqa: E402
from configurator import script_defaults  # noqa: E402
from model import GPT, GPTConfig, pad_vocab  # noqa: E402
from weights import from_state  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
parser.add_argument('--ckpt', help='a checkpoint file (default: the default config with random weights)')
parser.add_argument('--data', default=os.path.join(ROOT, 'data', 'stdlib'), help='dataset for the items')
parser.add_argument('--items', type=int, default=200)
parser.add_argument('--rounds', type=int, default=5)
parser.add_argument('--batch_sizes', default='16,64', help='batched sizes to time against batch_size=1')
args = parser.parse_args()
sys.excepthook = errors.report  # an Error (a --data that is not a dataset, say) is one line
sizes = [1]
for b in args.batch_sizes.split(','):
    if not b.isdigit() or int(b) < 1:
        parser.error(f"--batch_sizes takes comma-separated counts of at least 1, got {args.batch_sizes!r}")
    sizes.append(int(b))
sizes = list(dict.fromkeys(sizes))  # batch_size=1 is always the reference
for name in ('items', 'rounds'):
    if getattr(args, name) < 1:
        parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

data_tokenizer = ds.load_tokenizer(ds.tokenizer_state(args.data))  # reads the items' lines
if args.ckpt:
    state = runs.load(args.ckpt)
    model = from_state(state)
    tokenizer = ds.load_tokenizer(state['tokenizer'])  # scores them: the model's own, whatever --data holds
    name = args.ckpt
else:
    tokenizer = data_tokenizer
    cfg = script_defaults(os.path.join(ROOT, 'train.py'))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_embd=cfg['n_embd'],
                          block_size=cfg['block_size'], vocab_size=tokenizer.vocab_size,
                          padded_vocab_size=pad_vocab(tokenizer.vocab_size)))
    name = 'the default config, random weights'
model.eval()

val = ds.open_split(args.data, 'val')
lines = [l.strip() for l in data_tokenizer.decode(val[:200_000]).split('\n') if 8 <= len(l.strip()) <= 120]
# distinct choices: two equal ones tie, and batched and one-at-a-time scoring round a tie either way
choices = list(dict.fromkeys(l[:60] for l in lines))
if len(choices) < 4:
    parser.error(f"--data={args.data}: {len(choices)} distinct lines of 8-120 characters in its val split, "
                 f"at least 4 needed")
rng = np.random.default_rng(0)
items = [dict(question=lines[rng.integers(len(lines))], answer=int(rng.integers(4)),
              choices=[choices[i] for i in rng.choice(len(choices), 4, replace=False)]) for _ in range(args.items)]

print(f"{args.items} items x 4 choices, {name}: {model.num_params() / 1e6:.2f}M parameters, block {model.config.block_size}, "
      f"{torch.get_num_threads()} threads; {args.rounds} rounds, alternating")
rates = {b: [] for b in sizes}
results = {}
metrics.score_mcq(model, tokenizer, items[:20], batch_size=16)  # warm-up
for _ in range(args.rounds):
    for b in sizes:
        t0 = time.perf_counter()
        results[b] = metrics.score_mcq(model, tokenizer, items, batch_size=b)
        rates[b].append(args.items / (time.perf_counter() - t0))
# "same scores": batching changes the order of float sums (~1e-6 here), never a score by more than
# TOL; accuracy is compared on the items whose two best choices differ by more than TOL, since
# between closer ones either argmax is right
TOL = 1e-3
one = [np.array(lls) for lls in results[1]['loglikelihoods']]
clear = [i for i, lls in enumerate(one) if np.diff(np.sort(lls)[-2:])[0] > TOL]


def correct(lls):
    return sum(np.argmax(lls[i]) == items[i]['answer'] for i in clear)


for b in sizes:
    got = [np.array(lls) for lls in results[b]['loglikelihoods']]
    same = all(np.abs(g - o).max() <= TOL for g, o in zip(got, one)) and correct(got) == correct(one)
    r = rates[b]
    print(f"batch_size={b:<3} {np.median(r):7.1f} items/s (range {min(r):.1f}-{max(r):.1f})"
          + ("" if b == 1 else f", {np.median(r) / np.median(rates[1]):.1f}x one forward per choice; "
             f"{'same' if same else 'DIFFERENT'} scores (log-likelihoods within {TOL:g}, accuracy on the "
             f"{len(clear)} of {args.items} items whose two best differ by more)"))
