"""
Multiple-choice scoring throughput (items/s): metrics.score_mcq batched against one forward per
choice (batch_size=1), on the default model, alternating in one run so load on a shared machine
hits both alike:

    python prepare.py && python bench/bench_eval.py            # the default model, random weights
    python bench/bench_eval.py --ckpt=out/latest.safetensors   # a trained one
    python bench/bench_eval.py --items=600 --rounds=5 --batch_sizes=16,64

Items are made from the stdlib val split: a source line as the question and 4 other lines as
choices, so prompt and choice lengths are those of real code (about 30 and 10 tokens).
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
rng = np.random.default_rng(0)
items = []
for _ in range(args.items):
    picked = rng.choice(len(lines), 5, replace=False)
    items.append(dict(question=lines[picked[0]], choices=[lines[i][:60] for i in picked[1:]], answer=int(rng.integers(4))))

print(f"{args.items} items x 4 choices, {name}: {model.num_params() / 1e6:.2f}M parameters, block {model.config.block_size}, "
      f"{torch.get_num_threads()} threads; {args.rounds} rounds, alternating")
sizes = [1] + [int(b) for b in args.batch_sizes.split(',')]
rates = {b: [] for b in sizes}
results = {}
metrics.score_mcq(model, tokenizer, items[:20], batch_size=16)  # warm-up
for _ in range(args.rounds):
    for b in sizes:
        t0 = time.perf_counter()
        results[b] = metrics.score_mcq(model, tokenizer, items, batch_size=b)
        rates[b].append(args.items / (time.perf_counter() - t0))
for b in sizes:
    same = np.allclose(np.concatenate(results[b]['loglikelihoods']), np.concatenate(results[1]['loglikelihoods']),
                       atol=1e-3) and results[b]['acc'] == results[1]['acc']
    r = rates[b]
    print(f"batch_size={b:<3} {np.median(r):7.1f} items/s (range {min(r):.1f}-{max(r):.1f})"
          + ("" if b == 1 else f", {np.median(r) / np.median(rates[1]):.1f}x one forward per choice; "
             f"{'same' if same else 'DIFFERENT'} scores"))
