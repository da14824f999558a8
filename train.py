"""
Train a GPT on a dataset made by prepare.py, on one CPU, one GPU or many GPUs.

    python prepare.py && python train.py       # small model on the stdlib corpus (CPU, 7-9 min)
    python train.py config/python_code.py --max_iters=5000
    python train.py --init_from=best           # or latest_backup, step_0001000, epoch_0002, a path
    python train.py --overwrite=True           # start over: the old run moves to out/previous-*/
    python train.py --init_from=gpt2 --dataset=stdlib_gpt2   # GPT-2 (or hf:DIR, nanogpt:PATH)
    python train.py --list                     # the checkpoints in out_dir and whether they verify
    torchrun --standalone --nproc_per_node=4 train.py config/slm.py

The same command line starts a run and continues it: run it again after a crash, a Ctrl-C or a
requeue and it resumes exactly where the newest valid checkpoint in out_dir left off.
Ctrl-C or SIGTERM finishes the current iteration, saves `latest` and exits 0.
"""
import gc
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import fields
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import dataset as ds
import hardware
import logs
import metrics
import optim
import runs
from configurator import configure
from errors import Error, report
from model import GPT, GPTConfig, pad_vocab
from weights import (check_args, count_params, load_base, mark_trainable, resize_vocab,
                     trained_weights)

sys.excepthook = report  # an Error is one line, 'train.py: error: ...' (once a node under torchrun)

# -----------------------------------------------------------------------------
# default config: a small model that trains on the stdlib corpus on 2 CPU cores in 7-9 minutes
# I/O
out_dir = 'out'
data_dir = 'data'
dataset = 'stdlib'  # a prepared dataset, or a mixture with relative weights: 'qa:0.8,stdlib:0.2'
eval_datasets = ''  # more datasets whose val loss each eval logs, comma-separated (forgetting)
loss_tokens = 'flagged'  # 'flagged': the loss on the tokens prepare.py flags (answers); 'all'
# 'auto' (resume the run in out_dir if any, else scratch), 'scratch', 'resume', a checkpoint name
# or path, or another format's weights: gpt2 .. gpt2-xl, hf:DIR (Hugging Face GPT-2), nanogpt:PATH
init_from = 'auto'
reset_state = False  # with init_from: keep only the weights, start a new run (e.g. new data)
overwrite = False  # start a new run in an out_dir that holds one, moving the old run aside
log_interval = 10  # iterations per log line
eval_interval = 200  # iterations between evals (train and val loss)
eval_iters = 20  # batches per split in an eval
# checkpoint tiers (iterations); 0 disables a tier
ckpt_interval = 200  # `latest` (the previous one becomes `latest_backup`)
rolling_interval = 600  # `step_NNNNNNN`, the newest keep_last are kept
keep_last = 10  # step_ files kept; 0 keeps them all
save_epochs = True  # `epoch_NNNN` at the end of an epoch, at most one per rolling_interval
keep_epochs = 0  # the newest keep_epochs epoch_ files are kept; 0 keeps them all
save_best = True  # `best` after an eval that improves the val loss
async_save = True  # save in a background thread; training blocks only for a copy of the state
# model
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0
bias = True
# fine-tuning with LoRA (config/finetune_lora.py): adapters on a base model given by init_from
lora_rank = 0  # rank of the adapters; 0: none (and with trainable empty, every weight trains)
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = 'attn.c_attn,attn.c_proj'  # any of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
trainable = ''  # besides adapters: wte, wpe, ln, new_tokens (an extended vocabulary's rows), all
# batch: the global batch is batch_size * gradient_accumulation_steps windows, on any world size
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1850  # 7-9 min on 2 CPU cores: the time of the 2,000 AdamW iterations of before
max_epochs = None  # stop at the end of this epoch instead (max_iters still caps)
# optimizer: 'muon' (Muon for the weight matrices inside the blocks, AdamW for the rest) or 'adamw'
# (optim.py); the defaults are bench/bench_recipe.py's choice (docs/training.md)
optimizer = 'muon'
learning_rate = 8e-3  # both optimizers' peak (Muon's update is scaled to AdamW's RMS)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
# schedule: linear warmup, then 'wsd' (constant, then a decay to min_lr over the last decay_frac of
# the run; a higher --max_iters extends a finished run from where its decay began) or 'cosine'
lr_schedule = 'wsd'
warmup_iters = 20
decay_frac = 0.4  # wsd only
lr_decay_iters = None  # None: the run's last iteration
min_lr = 0.0  # at most learning_rate
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16', 'float16'
compile = None  # None: on for CUDA, off on the CPU (where bench/bench_train.py measured it slower)
peak_flops = None  # FLOP/s of one device for MFU; None: a GPU's datasheet peak, or measured on CPU
gradient_checkpointing = False  # recompute blocks in the backward: less memory, ~30% more compute
fp8 = False  # the blocks' matmuls in float8 (torchao; CUDA 8.9+): only pays for wide models
dist_timeout = 1800  # seconds a rank waits in a collective for the others
seed = 1337  # weights init and data order
wandb_log = False  # log to Weights & Biases (pip install wandb)
wandb_project = 'sturdygpt'
wandb_run_name = None
# evaluation during training, at iteration 0 (the baseline) and every eval_interval, as evaluate.py
eval_mcq = None  # a JSONL exam (evaluate.py's formats): logs eval/mcq_acc, eval/mcq_acc_norm
mcq_template = metrics.MCQ_TEMPLATE  # eval_mcq's prompt over the item's fields (the harness's)
mcq_delimiter = metrics.MCQ_DELIMITER  # between the prompt and each choice (the harness's ' ')
eval_generate = False  # sample the prompts: logs eval/repetition, eval/distinct_1..4, ...
eval_prompts = None  # the prompts file for eval_generate (one per line); None: evaluate.py's
tensorboard_log = False  # also write the wandb scalars to out_dir/tb/ (pip install tensorboard)
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
t_start = time.time()  # the run's wall time: this process's from here, earlier ones' in checkpoints

# -----------------------------------------------------------------------------
# config: the command line over the defaults. Run again after a crash, a Ctrl-C or a requeue, the
# same command resumes out_dir's run (its config under what it sets), never silently starting over
if '--list' in sys.argv[1:]:
    cfg, _ = configure(defaults, [a for a in sys.argv[1:] if a != '--list'], source=__file__)
    print(runs.listing(cfg['out_dir'], defaults))
    sys.exit(0)
config, explicit = configure(defaults, sys.argv[1:], source=__file__)
runs.check_config(config)  # before anything is read or written
if int(os.environ.get('RANK', 0)) == 0:  # one trainer per out_dir (rank 0's), before reading it
    runs.lock(config['out_dir'])
start = runs.start_point(config, explicit, defaults)
config, ckpt, ckpt_path = start['config'], start['state'], start['path']
continuing = start['continuing']
if ckpt is not None:
    runs.check_config(config, f' (in the config of {ckpt_path})')
globals().update(config)

# -----------------------------------------------------------------------------
# device, DDP and dtype: decided once, then objects that do nothing when unused
ddp = int(os.environ.get('RANK', -1)) != -1
# under torchrun, cuda:LOCAL_RANK is made current before anything (the dtype probe) touches a GPU
device, dtype = hardware.resolve(device, dtype, int(os.environ['LOCAL_RANK']) if ddp else None)
device_type = torch.device(device).type
if ddp:
    # device_id binds the process group to this rank's GPU, so barriers need not guess it
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo',
                            timeout=timedelta(seconds=dist_timeout),
                            device_id=torch.device(device) if device_type == 'cuda' else None)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sys.excepthook = report  # ours again: torch's prefixes '[rank0]: ' to every line
    # the ranks agree on stopping every iteration: over gloo on a CPU tensor, so that agreeing
    # costs a round trip between the CPUs and never makes a CPU wait for its GPU
    control = dist.new_group(backend='gloo') if device_type == 'cuda' else None
else:
    rank, world_size = 0, 1
master_process = rank == 0
if gradient_accumulation_steps % world_size:
    raise Error(f"gradient_accumulation_steps={gradient_accumulation_steps} must be "
                f"divisible by the number of processes ({world_size})")
micro_steps = gradient_accumulation_steps // world_size
ctx = hardware.autocast(device, dtype)
torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+: ~8x faster matmuls, loss unaffected
torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(seed + rank)
np.random.seed(seed + rank)

# -----------------------------------------------------------------------------
# data: windows of block_size + 1 tokens (question/answer data: whole examples packed in them), in
# an order that is a function of (seed, epoch), each dataset of a mixture at its own (epoch, index)
mixture = ds.parse_mixture(dataset)
data = [ds.open_dataset(data_dir, name, block_size) for name, _ in mixture]
watched = [ds.open_dataset(data_dir, name, block_size, splits=('val',))
           for name in runs.eval_names(eval_datasets)]
tokenizer = ds.model_tokenizer(data + watched)  # the model's: every dataset's ids agree with it
shares, parts = [w for _, w in mixture], [d['train'] for d in data]
vocab_size, n_windows = tokenizer['vocab_size'], parts[0]['n']  # an epoch is the first dataset's
data_fingerprint = ds.mixture_fingerprint([(d['meta'], w) for d, w in zip(data, shares)])
loss_on = ''  # with question/answer data, the log says which tokens the loss is on
if any(d['meta'].get('flagged') for d in data + watched):
    loss_on = 'on the flagged tokens' if loss_tokens == 'flagged' else 'on every token'
windows_per_iter = batch_size * gradient_accumulation_steps
tokens_per_iter = windows_per_iter * block_size
max_iters = runs.planned_iters(config, n_windows / shares[0])
wsd_start = runs.decay_start(config, n_windows / shares[0])  # None for cosine
if continuing:  # a longer wsd run continues from where its decay began
    ckpt_path, ckpt = runs.before_decay(ckpt_path, ckpt, config, n_windows / shares[0], defaults,
                                        verbose=master_process)
# checkpoint tiers: {tier: (every so many iterations, files kept)}, epoch_ at most one a rolling
epoch_iters = n_windows / shares[0] / windows_per_iter
every_epoch = save_epochs and epoch_iters * max(1, math.ceil(rolling_interval / epoch_iters))
tiers = {'latest': (bool(ckpt_interval), 2), 'best': (save_best, 1),
         'step': (rolling_interval, keep_last), 'epoch': (every_epoch, keep_epochs)}
# before anything is written, a missing logger or eval_mcq / eval_generate file stops the run
eval_items, eval_prompt_list, eval_tokenizer = None, None, None
if master_process:
    logs.check(config)
    if eval_mcq or eval_generate:
        eval_items = metrics.load_mcq(eval_mcq, mcq_template) if eval_mcq else None
        eval_prompt_list = metrics.load_prompts(eval_prompts) if eval_generate else None
        eval_tokenizer = ds.load_tokenizer(tokenizer)


def get_batch(split, picks):
    """x, y (B, T) on the device for picks [(dataset, token ranges)], y -1 where a target does not
    count in the loss, and the number of those that do."""
    xy, counted = ds.batch([d.get(split) for d in data + watched], picks, block_size,
                           tokenizer['eot_id'], vocab_size, loss_tokens == 'all')
    xy = torch.from_numpy(xy)
    if device_type == 'cuda':
        # one contiguous pinned copy, sliced on the GPU: pinning the strided x / y views would
        # stage each through an unpinned temporary, and the copy could not overlap compute
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :block_size], xy[:, block_size:], counted


# -----------------------------------------------------------------------------
# model and optimizer: from scratch, or the checkpoint's weights (and, continuing its run, its
# state). With lora_rank or trainable set, only the adapters and what trainable names train.
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
model_args.update(vocab_size=vocab_size, padded_vocab_size=pad_vocab(vocab_size))
weights = None
if ckpt is not None:
    ds.check_fits(ckpt, ckpt_path, dataset, tokenizer, data_fingerprint, new_run=reset_state)
    args, weights = ckpt['model_args'], ckpt['model']
    if not continuing and args.get('lora_rank'):
        raise Error(f"{ckpt_path} is a LoRA checkpoint; to build on it, export it merged first "
                    f"(python export.py --ckpt={ckpt_path} --out=merged.safetensors)")
    if args['vocab_size'] != vocab_size:  # the data's tokenizer extends the checkpoint's
        weights = resize_vocab(weights, args['vocab_size'], vocab_size)
    else:  # padded_vocab_size: absent (None, unpadded) in checkpoints from before padding
        model_args['padded_vocab_size'] = args.get('padded_vocab_size')
model = GPT(check_args(model_args))  # a size that cannot fit in memory is refused before allocating
if weights is not None:
    load_base(model, weights)  # the adapters, if any and not in weights, keep their init
if lora_rank or trainable:
    mark_trainable(model, trainable, (tokenizer.get('extends') or {}).get('vocab_size'))
trained, total = count_params(model)
frozen = trained < total  # then checkpoints hold only what trains, and name the base they build on
model.gradient_checkpointing = gradient_checkpointing
model.to(device)
if fp8:  # before the optimizer and compile see the layers
    hardware.check_fp8(device)
    hardware.convert_to_fp8(model)
optimizers = optim.configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2),
                                        device_type, optimizer)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
iter_num, best_val_loss, wandb_id, last_eval, run_seconds = 0, math.inf, None, {}, 0.0
positions = [(0, 0)] * len(data)  # each dataset's (epoch, index) in its order
last_epoch_ckpt = None  # iteration of the newest epoch_ checkpoint
if ckpt is not None and not reset_state:
    optim.load_state_dicts(optimizers, ckpt['optimizers'], model, ckpt_path)
    if ckpt['scaler']:  # empty when the run was not float16: a fresh scaler keeps its defaults
        scaler.load_state_dict(ckpt['scaler'])
    iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    positions = [tuple(p) for p in (ckpt['data_pos'] if len(data) > 1 else [ckpt['data_pos']])]
    last_epoch_ckpt, wandb_id = ckpt.get('last_epoch_ckpt'), ckpt.get('wandb_id')
    run_seconds = ckpt.get('wall_seconds', 0.0)  # the earlier processes' time, up to this one
    last_eval = {'train': ckpt['train_loss'], 'val': ckpt['val_loss']}
    # every rank's RNG (dropout) continues where it was; on another number of processes the ranks
    # beyond the saved ones keep seed + rank, so dropout masks (only they) differ from the old run
    rngs = ckpt.get('rng_ranks') or [ckpt['rng']]
    if rank < len(rngs):
        runs.set_rng_state(rngs[rank])
    if master_process:
        print(f"resumed from {ckpt_path} at iter {iter_num}, epoch {positions[0][0]}, "
              f"window {positions[0][1]}/{n_windows}")
if ddp:  # each rank found its own start point: on node-local disks they can differ
    runs.check_same_start(iter_num, ckpt_path, world_size)
if iter_num >= max_iters:  # a finished run, run again: it says so and starts nothing
    if master_process:
        print(f"the run in {out_dir} is complete (iter {iter_num}, max_iters={max_iters}); to "
              f"train it further, raise --max_iters")
    if ddp:
        dist.destroy_process_group()
    sys.exit(0)
compile = device_type == 'cuda' if compile is None else compile
raw_model = model  # plain module: what checkpoints save, so no '_orig_mod.' or 'module.' prefixes
if compile:
    model = torch.compile(model)
eval_model = model  # evaluation needs no DDP gradient sync
if ddp:
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)

# -----------------------------------------------------------------------------
# out_dir (rank 0 writes): checked before the first write, an older run moved aside for a new one,
# the log trimmed for a continued one; then the checkpoint writer, wandb and TensorBoard
base = ckpt.get('base') if continuing else None  # where a run with frozen weights finds the rest
if master_process:  # a checkpoint holds what trains and at most two moments of it (AdamW's)
    file_bytes = sum(3 * p.numel() * p.element_size() for p in model.parameters()
                     if p.requires_grad)
    runs.prepare_out_dir(out_dir, new_run=not continuing, file_bytes=file_bytes,
                         files=runs.files_kept(max_iters - iter_num, tiers))
    if continuing:
        logs.trim(out_dir, iter_num)
    if frozen and not continuing:  # a run that saves only what trains keeps its base beside it
        base = runs.keep_base(out_dir, ckpt_path, ckpt)
ckpt = None  # free the loaded tensors
# never pruned: the file this run started from, and where a wsd decay begins (to extend the run)
protect = [ckpt_path] if ckpt_path else []
if wsd_start:
    protect.append(os.path.join(out_dir, f'step_{wsd_start:07d}.safetensors'))
writer = checkpoint.Writer(background=async_save)
log = logs.Log(config, iter_num, wandb_id, continuing, active=master_process)
# MFU: model FLOPs (6N + attention, see model.flops_per_token) per second over the hardware's peak
flops_per_token = raw_model.flops_per_token()
peak_flops = peak_flops or hardware.peak_flops(device, dtype)
if master_process:
    part = (f" ({trained:,} of all {total:,} trained: {100 * trained / total:.2f}%)"
            if frozen else "")
    peak = f'{peak_flops / 1e12:.3g} TFLOP/s' if peak_flops else 'an unknown peak'
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters{part}, {tokens_per_iter:,} "
          f"tokens/iter, {n_windows:,} windows/epoch, device {device}, dtype {dtype}, "
          f"{world_size} process(es), MFU against {peak}, the loss {loss_on or 'on every token'}")
# a stop signal only sets a flag; the loop saves at the next iteration boundary and exits. SIGUSR1:
# SLURM's warning before preemption (--signal=USR1@120); SIGHUP: torchrun forwards it
stop_signal = None


def on_signal(signum, frame):
    global stop_signal
    stop_signal = signum


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(sig, on_signal)

# -----------------------------------------------------------------------------
# helpers
def get_lr(it):
    """The learning rate at iteration it: a linear warmup, then wsd (constant until wsd_start,
    then 1 - sqrt to min_lr, which beat a linear decay in Hagele et al. 2024) or cosine."""
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    if lr_schedule == 'wsd' and it < wsd_start:
        return learning_rate
    if lr_schedule == 'wsd':
        done = (it - wsd_start) / (decay_iters - wsd_start)
        return min_lr + (1 - math.sqrt(done)) * (learning_rate - min_lr)
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """{(dataset, split): mean loss per counted target} on the same fixed windows every time, split
    across ranks: the training datasets' two splits, the watched ones' val. Whole batches only: a
    short last batch would make torch.compile recompile for its shape."""
    out = {}
    model.eval()
    for d, dset in enumerate(data + watched):
        for split in ('train', 'val') if d < len(data) else ('val',):
            n = dset[split]['n']
            size = min(batch_size, n)  # a split smaller than one batch: one smaller batch
            order = np.random.default_rng([seed, 2**31]).permutation(n)
            windows = ds.fixed_windows(dset[split], order[:min(eval_iters, n // size) * size])
            total = torch.zeros(2, device=device)  # (sum of losses * targets, targets)
            for k, first in enumerate(range(0, len(windows), size)):
                if k % world_size == rank:
                    x, y, counted = get_batch(split, [(d, w) for w in windows[first:first + size]])
                    with ctx:
                        _, loss = eval_model(x, y)
                    total[0] += loss.float() * counted  # on the device: no copy to wait for
                    total[1] += counted
            if ddp:
                dist.all_reduce(total)
            out[dset['name'], split] = (total[0] / total[1].clamp(min=1)).item()
    model.train()
    return out


def save(names):
    """Every rank: gather the RNG states; rank 0: hand the state to the writer, to be published
    under the tier names (it prints when the file is written). Returns the seconds training was
    blocked (left out of the iteration timing)."""
    rngs = [runs.rng_state()]
    if ddp:  # each rank's dropout stream, so a resumed run continues every one of them
        rngs = [None] * world_size if master_process else None
        dist.gather_object(runs.rng_state(), rngs, dst=0)
    if not master_process:
        return 0.0
    state = {  # a run with frozen weights saves what trains (and names its base); others, all
        'model': trained_weights(raw_model) if frozen else raw_model.state_dict(), 'base': base,
        'optimizers': optim.state_dicts(optimizers, raw_model), 'scaler': scaler.state_dict(),
        'iter_num': iter_num, 'epoch': positions[0][0],
        'data_pos': list(positions[0]) if len(data) == 1 else [list(p) for p in positions],
        'best_val_loss': best_val_loss, 'last_epoch_ckpt': last_epoch_ckpt,
        'val_loss': last_eval.get('val'), 'train_loss': last_eval.get('train'),
        'rng': rngs[0], 'rng_ranks': rngs, 'config': config, 'model_args': model_args,
        'origin': start['origin'], 'tokenizer': tokenizer,
        'data': {'dataset': dataset, 'fingerprint': data_fingerprint}, 'wandb_id': log.wandb_id,
        'time': time.time(), 'wall_seconds': run_seconds + time.time() - t_start,
    }
    keep = {tier: files for tier, (_, files) in tiers.items()}
    return writer.save(out_dir, state, names, keep=keep, protect=protect)


def run_eval():
    """The losses of estimate_loss, a mixture's weighted by its shares, printed and logged with
    each dataset's val loss when there are several; returns {'train', 'val'}."""
    each = estimate_loss()
    losses = {split: sum(w * each[d['name'], split] for d, w in zip(data, shares))
              for split in ('train', 'val')}
    if master_process:
        per = {f"val_loss/{name}": v for (name, split), v in each.items()
               if split == 'val' and len(data + watched) > 1}
        print(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
              f"val ppl {math.exp(losses['val']):.2f}" + (f" ({loss_on})" if loss_on else "")
              + ''.join(f", {k.replace('_loss/', ' ')} {v:.4f}" for k, v in per.items()))
        entry = {'step': iter_num, 'epoch': positions[0][0], 'train_loss': losses['train'],
                 'val_loss': losses['val'], 'val_ppl': math.exp(losses['val']), **per}
        losses['each'] = per
        if eval_tokenizer:  # eval_mcq / eval_generate: evaluate.py's numbers, on the plain module
            raw_model.eval()
            with ctx:
                entry.update(metrics.training_metrics(
                    raw_model, eval_tokenizer, eval_items, eval_prompt_list, seed=seed,
                    device=device, mcq_template=mcq_template, mcq_delimiter=mcq_delimiter))
            raw_model.train()
            print(f"eval {iter_num}: " + ', '.join(f"{k} {v:.3f}" for k, v in entry.items()
                                                   if k in metrics.TRAINING_KEYS))
        log.write(entry)
    return losses


window, log_losses, last_finite = [], [], None  # window: per-iteration losses not yet checked


def diverged(what):
    """Stop with one line when training produced a non-finite number, before that state is saved."""
    if master_process:
        writer.wait()  # the last good save completes; nothing later is saved
    last = f"{last_finite[1]:.4f} at iter {last_finite[0]}" if last_finite else "none yet"
    raise Error(f"{what} (last finite loss: {last}); nothing from it was saved. Likely causes: "
                f"learning_rate={learning_rate:g} too high, grad_clip={grad_clip:g}, float16 "
                f"overflow (try --dtype=bfloat16), or damaged data; the same command with a lower "
                f"--learning_rate continues from the last checkpoint")


def check_losses():
    """The per-iteration losses since the last call, averaged over ranks, in one device sync; the
    first that is not finite stops the run (diverged)."""
    global window, last_finite
    if not window:
        return []
    losses = torch.stack(window)
    window = []
    if ddp:
        dist.all_reduce(losses)
    values = (losses / world_size).tolist()
    for it, v in enumerate(values, start=iter_num - len(values) + 1):
        if not math.isfinite(v):
            diverged(f"the training loss is {v} at iter {it}")
        last_finite = (it, v)
    return values


# -----------------------------------------------------------------------------
# training loop
start_iter = iter_num
if iter_num == 0:
    last_eval = run_eval()  # the untrained model's loss, as a baseline
# timing for tokens/s and MFU: from the end of this process's first iteration (compilation and
# warm-up), leaving out evals and saves; the ETA's pace: the wall time of the last 10 log intervals
t0, timed, paces = time.time(), -1, deque(maxlen=11)
while iter_num < max_iters:
    lr = get_lr(iter_num)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group['lr'] = lr
    picks, next_positions = ds.mixture_windows(positions, parts, shares, windows_per_iter, seed)
    # the mean over the iteration's counted targets: each micro-batch's mean weighs its share
    n_iter = ds.count_trained(parts, picks, block_size, loss_tokens == 'all')
    iter_loss = torch.zeros((), device=device)
    for micro in range(micro_steps):
        # rank r takes micro-batches r, r + world_size, ...: the same global batch on any world size
        k = micro * world_size + rank
        x, y, n_micro = get_batch('train', picks[k * batch_size:(k + 1) * batch_size])
        if ddp:
            model.require_backward_grad_sync = micro == micro_steps - 1  # all-reduce once
        with ctx:
            _, loss = model(x, y)
            loss = loss / (n_iter / (n_micro * world_size)) if n_micro else loss * 0
        scaler.scale(loss).backward()
        iter_loss += loss.detach()
    window.append(iter_loss)
    if grad_clip:  # the norm of all the gradients, each optimizer's unscaled first
        for opt in optimizers.values():
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    for opt in optimizers.values():  # float16: each skips its step when its gradients overflowed
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    epoch_done = next_positions[0][0] > positions[0][0]
    iter_num, positions = iter_num + 1, next_positions
    timed += 1
    if timed == 0:
        if device_type == 'cuda':
            torch.cuda.synchronize()  # the warm-up iteration's queued work is not timed
        t0 = time.time()
        paces.append((t0, iter_num))

    if iter_num % log_interval == 0 or iter_num == max_iters:
        log_losses += check_losses()
        lossf = sum(log_losses) / len(log_losses)
        log_losses = []
        dt = (time.time() - t0) / timed if timed > 0 else None  # None: only the warm-up iteration
        t0, timed = time.time(), 0
        tok_s = dt and tokens_per_iter / dt
        mfu = dt and peak_flops and 100 * flops_per_token * tok_s / (peak_flops * world_size)
        # this rank's peak GPU memory: what tensors used, and what the caching allocator held
        mem = {}
        if device_type == 'cuda':
            mem = {'peak_mem_gib': torch.cuda.max_memory_allocated() / 2**30,
                   'peak_mem_reserved_gib': torch.cuda.max_memory_reserved() / 2**30}
        if master_process:
            paces.append((time.time(), iter_num))
            (t_a, it_a), (t_b, it_b) = paces[0], paces[-1]  # the last 10 log intervals' pace
            left = (t_b - t_a) / (it_b - it_a) * (max_iters - iter_num) if it_b > it_a else 0.0
            record = {'step': iter_num, 'epoch': positions[0][0], 'loss': lossf, 'lr': lr,
                      'ppl': math.exp(min(lossf, 50)), 'tokens_seen': iter_num * tokens_per_iter,
                      'ms_per_iter': dt and dt * 1000, 'tokens_per_sec': tok_s, 'mfu': mfu, **mem}
            print(logs.iter_line(record, max_iters, left))
            log.write(record)

    best = False
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        t_eval = time.time()
        last_eval = run_eval()
        best = save_best and last_eval['val'] < best_val_loss
        best_val_loss = min(best_val_loss, last_eval['val'])
        t0 += time.time() - t_eval  # iteration timing leaves out evals

    stop = stop_signal is not None or log.error is not None  # a run that cannot log stops, saving
    if ddp:  # every rank stops at the same iteration, whichever got the signal
        flag = torch.tensor(float(stop))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        stop = bool(flag)
    names = []  # the checkpoint tiers due now: one file, linked under each name
    if stop or (ckpt_interval and iter_num % ckpt_interval == 0) or iter_num == max_iters:
        names.append('latest')
    if rolling_interval and (iter_num % rolling_interval == 0 or iter_num == wsd_start):
        names.append(f'step_{iter_num:07d}')
    # epoch_ files at most once per rolling_interval: on a small corpus an epoch is a few iterations
    if epoch_done and save_epochs and (last_epoch_ckpt is None
                                       or iter_num - last_epoch_ckpt >= rolling_interval):
        names.append(f'epoch_{positions[0][0]:04d}')
        last_epoch_ckpt = iter_num
    if best:
        names.append('best')
    if names:
        log_losses += check_losses()  # a state whose loss or weights went non-finite is never saved
        if not torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all():
            diverged(f"the weights are not finite after iter {iter_num}")
        t0 += save(names)
    if stop:
        if master_process and log.error is None:
            name = signal.Signals(stop_signal).name if stop_signal else 'a signal on another rank'
            print(f"stopped by {name} at iter {iter_num}, saving "
                  f"{os.path.join(out_dir, 'latest.safetensors')}; resume with the same command: "
                  f"{runs.command_line()}", flush=True)
        break
if master_process:
    writer.wait()  # the last save (the final one, or a signal's) is on disk before the process ends
    if log.error:
        raise Error(f"{log.error}; stopped at iter {iter_num} with latest saved: fix it and run "
                    f"the same command to continue")

# -----------------------------------------------------------------------------
# the end: a summary of a run that finished now, loggers closed, ranks leave together
finished = iter_num >= max_iters and iter_num > start_iter
if master_process and finished and last_eval.get('val') is not None:
    summary = {'iters': iter_num, 'epochs': positions[0][0] + positions[0][1] / n_windows,
               'final_val_loss': last_eval['val'], 'final_val_ppl': math.exp(last_eval['val']),
               'best_val_loss': best_val_loss, 'best_val_ppl': math.exp(best_val_loss),
               'tokens_seen': iter_num * tokens_per_iter,
               'wall_seconds': run_seconds + time.time() - t_start,
               'wall_seconds_this_process': time.time() - t_start, 'config': config,
               **{f'final_{k}': v for k, v in last_eval.get('each', {}).items()}}
    logs.write_summary(out_dir, summary)
    print(f"done: val loss {summary['final_val_loss']:.4f} (best {best_val_loss:.4f}), "
          f"{summary['tokens_seen']:,} tokens in {summary['wall_seconds'] / 60:.1f} min")
log.close()
if ddp:
    dist.barrier()  # ranks leave together: gloo aborts a rank whose peer tears down mid-exit
    # the DDP wrapper holds the process group: freed first, gloo's worker threads end with the
    # group here, not at interpreter exit, where they can abort the process (SIGABRT)
    del model
    gc.collect()
    dist.destroy_process_group()
