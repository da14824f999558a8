"""
Train a GPT on a dataset made by prepare.py, on one CPU, one GPU or many GPUs.

    python prepare.py && python train.py                 # small model on the stdlib corpus (CPU, 7-9 min)
    python train.py config/python_code.py --max_iters=5000
    python train.py --init_from=best                     # or latest_backup, step_0001000, epoch_0002, a path
    python train.py --overwrite=True                     # start over: the old run moves to out/previous-*/
    python train.py --init_from=gpt2 --dataset=stdlib_gpt2   # fine-tune GPT-2 (or hf:DIR, nanogpt:ckpt.pt)
    python train.py --list                               # the checkpoints in out_dir and whether they verify
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
from contextlib import nullcontext
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
import runs
from configurator import check_ranges, configure
from model import (GPT, GPTConfig, check_args, convert_to_fp8, count_params, fp8_problem, load_base,
                   mark_trainable, pad_vocab, resize_vocab, trained_weights)
from optim import configure_optimizers, load_optimizer_state, wte_moments

# -----------------------------------------------------------------------------
# default config: a small model that trains on the stdlib corpus on 2 CPU cores in 7-9 minutes
# I/O
out_dir = 'out'
data_dir = 'data'
dataset = 'stdlib'
init_from = 'auto'  # 'auto' (resume the run in out_dir if any, else scratch), 'scratch', 'resume', a checkpoint name / path
# init_from also takes another format's weights: gpt2 .. gpt2-xl, hf:DIR (Hugging Face GPT-2), nanogpt:PATH (ckpt.pt)
reset_state = False  # with init_from: keep only the weights, start a new run (e.g. fine-tune on new data)
overwrite = False  # start a new run in an out_dir that holds one, moving the old run to out_dir/previous-<time>/
log_interval = 10  # iterations per log line
eval_interval = 200  # iterations between evals (train and val loss)
eval_iters = 20  # batches per split in an eval
# checkpoint tiers (iterations); 0 disables a tier
ckpt_interval = 200  # `latest` (the previous one becomes `latest_backup`)
rolling_interval = 600  # `step_NNNNNNN`, the newest keep_last are kept
keep_last = 10  # step_ files kept; 0 keeps them all
save_epochs = True  # `epoch_NNNN` at the end of an epoch, at most one per rolling_interval iterations
keep_epochs = 0  # the newest keep_epochs epoch_ files are kept; 0 keeps them all
save_best = True  # `best` after an eval that improves the val loss
async_save = True  # write checkpoints in a background thread; training blocks only for a copy of the state
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
trainable = ''  # besides adapters, comma-separated: wte, wpe, ln, new_tokens (an extended vocabulary's rows), all
# batch: the global batch is batch_size * gradient_accumulation_steps sequences on any number of processes
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1850  # 7-9 min on 2 CPU cores: the time of the 2,000 AdamW iterations before bench_recipe.py
max_epochs = None  # stop at the end of this epoch instead (max_iters still caps)
# optimizer: Muon for the weight matrices inside the blocks, AdamW for the rest; or AdamW for all
# (optim.py). The defaults are bench/bench_recipe.py's choice (docs/training.md)
optimizer = 'muon'  # 'muon' or 'adamw'
learning_rate = 8e-3  # both optimizers' peak (Muon's update is scaled to AdamW's RMS)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
# schedule: linear warmup, then 'wsd' (constant, then a decay to min_lr over the last decay_frac of the
# run; a higher --max_iters extends a finished run from where its decay began) or 'cosine' to min_lr
lr_schedule = 'wsd'
warmup_iters = 20
decay_frac = 0.4  # wsd only
lr_decay_iters = None  # None: the run's last iteration
min_lr = 0.0
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16', 'float16'
compile = None  # None: on for CUDA, off on the CPU (where bench/bench_train.py measured it slower)
peak_flops = None  # FLOP/s of one device for MFU; None: the GPU's datasheet peak, or measured on CPU
gradient_checkpointing = False  # recompute each block in the backward pass: less memory, ~30% more compute
fp8 = False  # the blocks' matmuls in float8 (torchao; CUDA, compute capability 8.9+): only pays for wide models
dist_timeout = 1800  # seconds a rank waits in a collective for the others (rank 0 alone writes a final save)
seed = 1337  # weights init and data order
wandb_log = False  # log to Weights & Biases (pip install wandb)
wandb_project = 'sturdygpt'
wandb_run_name = None
# evaluation during training: at iteration 0 (the baseline) and every eval_interval, as evaluate.py measures
eval_mcq = None  # a JSONL exam (evaluate.py's formats): logs eval/mcq_acc, eval/mcq_acc_norm
mcq_template = 'Question: {question}\nAnswer:'  # eval_mcq's prompt, over the item's fields ({question} alone: cloze)
mcq_delimiter = ' '  # between the prompt and each choice (lm-evaluation-harness's target_delimiter)
eval_generate = False  # sample the prompts: logs eval/repetition, eval/distinct_1..4, eval/code_parses, ...
eval_prompts = None  # the prompts file for eval_generate (one per line); None: evaluate.py's code prompts
tensorboard_log = False  # also write the wandb scalars to out_dir/tb/ (pip install tensorboard)
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
t_start = time.time()  # the run's wall time: this process's from here, earlier ones' from checkpoints
# under torchrun every rank meets the same bad config, data or checkpoint: one rank per node says so
speaks = int(os.environ.get('LOCAL_RANK', 0)) == 0


def fail(msg):
    """Stop with one line, 'train.py: error: msg' (the other ranks of a node leave quietly)."""
    raise SystemExit(f"train.py: error: {msg}" if speaks else 1)


RANGES = dict(n_layer='[1, inf)', n_head='[1, inf)', n_embd='[1, inf)', block_size='[1, inf)', dropout='[0, 1)',
              batch_size='[1, inf)', gradient_accumulation_steps='[1, inf)', max_iters='[1, inf)',
              max_epochs='(0, inf)', learning_rate='(0, inf)', weight_decay='[0, inf)', beta1='[0, 1)',
              beta2='[0, 1)', grad_clip='[0, inf)', warmup_iters='[0, inf)', lr_decay_iters='[1, inf)',
              min_lr='[0, inf)', log_interval='[1, inf)', eval_interval='[1, inf)', eval_iters='[1, inf)',
              ckpt_interval='[0, inf)', rolling_interval='[0, inf)', keep_last='[0, inf)', keep_epochs='[0, inf)',
              seed='[0, 2147483647]', peak_flops='(0, inf)', lora_rank='[0, inf)', lora_alpha='(0, inf)',
              lora_dropout='[0, 1)', dist_timeout='[1, inf)', decay_frac='(0, 1]')


def check_config(c, where=''):
    """One line per value out of range (the whole config: files, command line, a checkpoint's)."""
    try:
        check_ranges(c, RANGES, 'train.py', where)
    except SystemExit as e:
        raise SystemExit(e.code if speaks else 1) from None
    if c['n_embd'] % c['n_head']:
        fail(f"n_embd={c['n_embd']} must be a multiple of n_head={c['n_head']}{where}")
    for key, allowed in (('optimizer', ('muon', 'adamw')), ('lr_schedule', ('wsd', 'cosine'))):
        if c[key] not in allowed:
            fail(f"{key}={c[key]!r} must be one of {', '.join(allowed)}{where}")
    if not c['out_dir']:
        fail("out_dir is empty (name a folder, e.g. --out_dir=out)")
    try:
        GPTConfig(lora_rank=c['lora_rank'], lora_targets=c['lora_targets'])
    except ValueError as e:
        fail(f"{e}{where}")


# -----------------------------------------------------------------------------
# config: the command line over the defaults. The same command line starts a run and, after a
# crash, a Ctrl-C or a requeue, continues it: a run in out_dir is resumed (with its own config
# under what this command sets), never silently started over
if '--list' in sys.argv[1:]:
    cfg, _ = configure(defaults, [a for a in sys.argv[1:] if a != '--list'], prog='train.py', source=__file__)
    if not os.path.isdir(cfg['out_dir']):
        fail(f"out_dir {cfg['out_dir']!r} is not a folder: no run to list (set --out_dir)")
    print(runs.listing(cfg['out_dir'], defaults))
    sys.exit(0)
try:
    config, explicit = configure(defaults, sys.argv[1:], prog='train.py', source=__file__)
except SystemExit as e:  # a typo or a bad config file, said once
    raise SystemExit(e.code if speaks or not e.code else 1) from None
check_config(config)  # before anything is read or written
try:
    if int(os.environ.get('RANK', 0)) == 0:  # one trainer per out_dir (rank 0's under DDP), before reading it
        runs.lock(config['out_dir'])
    start = runs.start_point(config, explicit, defaults)
except checkpoint.CheckpointError as e:
    fail(e)
config, ckpt, ckpt_path, continuing = start['config'], start['state'], start['path'], start['continuing']
if ckpt is not None:
    check_config(config, f' (in the config of {ckpt_path})')
globals().update(config)

# -----------------------------------------------------------------------------
# device, DDP and dtype: decided once, then objects that do nothing when unused
ddp = int(os.environ.get('RANK', -1)) != -1
# under torchrun, cuda:LOCAL_RANK is made current before anything (the dtype probe) touches a GPU
# (a device this rank lacks, cuda:LOCAL_RANK past the GPUs there are, is said by that rank)
device, dtype = hardware.resolve(device, dtype, int(os.environ['LOCAL_RANK']) if ddp else None, prog='train.py')
device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
if ddp:
    # device_id binds the process group to this rank's GPU, so barriers need not guess it
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo', timeout=timedelta(seconds=dist_timeout),
                            device_id=torch.device(device) if device_type == 'cuda' else None)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    def quiet_peer_loss(kind, e, tb):
        """A rank whose peer failed gets 'Connection closed by peer' from its next collective: the
        failing rank's own one-line error says why, so the others leave quietly (exit status 1)."""
        if 'by peer' not in str(e):
            sys.__excepthook__(kind, e, tb)

    sys.excepthook = quiet_peer_loss
    # the ranks agree on stopping every iteration: over gloo on a CPU tensor, so that agreeing costs a
    # round trip between the CPUs and never makes a CPU wait for its GPU
    control = dist.new_group(backend='gloo') if device_type == 'cuda' else None
else:
    rank, world_size = 0, 1
master_process = rank == 0
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be "
         f"divisible by the number of processes ({world_size})")
micro_steps = gradient_accumulation_steps // world_size
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+: ~8x faster matmuls, loss unaffected
torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(seed + rank)
np.random.seed(seed + rank)

# -----------------------------------------------------------------------------
# data: fixed windows of block_size + 1 tokens, visited once per epoch in an order that is a
# function of (seed, epoch); the position (epoch, index) is global, so any number of ranks agree
data_path = os.path.join(data_dir, dataset)
try:
    meta = ds.read_meta(data_path)
    tokenizer = ds.tokenizer_state(data_path)
except ds.DatasetError as e:
    fail(e.reason)
vocab_size = tokenizer['vocab_size']
train_data, val_data = ds.open_split(data_path, 'train'), ds.open_split(data_path, 'val')
for split, arr in (('train', train_data), ('val', val_data)):
    if len(arr) < block_size + 1:
        fail(f"{data_path} {split} split has {len(arr)} tokens, fewer than "
             f"block_size+1={block_size + 1}; use a smaller --block_size or a larger corpus")
n_windows = (len(train_data) - 1) // block_size
windows_per_iter = batch_size * gradient_accumulation_steps
tokens_per_iter = windows_per_iter * block_size
if max_epochs is not None:
    max_iters = min(max_iters, math.ceil(max_epochs * n_windows / windows_per_iter))
wsd_start = runs.decay_start(config, n_windows)  # None for cosine
if continuing:  # a longer wsd run continues from where its decay began
    ckpt_path, ckpt = runs.before_decay(ckpt_path, ckpt, config, n_windows, defaults, verbose=master_process)
if master_process:  # the loggers asked for import now: a missing one stops the run before anything is written
    try:
        logs.check(config)
    except logs.LogError as e:
        fail(e)
# eval_mcq / eval_generate: their files are read now, so a bad one stops the run before anything is written
eval_items, eval_prompt_list, eval_tokenizer = None, None, None
if master_process and (eval_mcq or eval_generate):
    try:
        eval_items = metrics.load_mcq(eval_mcq, mcq_template) if eval_mcq else None
        eval_prompt_list = metrics.load_prompts(eval_prompts) if eval_generate else None
        eval_tokenizer = ds.load_tokenizer(tokenizer)
    except metrics.EvalError as e:
        fail(e)
    except ds.DatasetError as e:
        fail(e.reason)


def get_batch(data, windows):
    xy = np.stack([data[w * block_size: w * block_size + block_size + 1] for w in windows])  # (B, T + 1)
    if xy.max() >= vocab_size:  # an id past the embedding: a traceback on the CPU, a device assert on a GPU
        raise SystemExit(f"train.py: error: {data_path} holds token id {xy.max()} but its vocabulary has "
                         f"{vocab_size} tokens (the dataset is damaged; rebuild it: python prepare.py --force ...)")
    xy = torch.from_numpy(xy.astype(np.int64))
    if device_type == 'cuda':
        # one contiguous pinned copy, sliced on the GPU: pinning the strided x / y views would
        # stage each through an unpinned temporary, and the copy could not overlap compute
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]


# -----------------------------------------------------------------------------
# model and optimizer: from scratch, or the checkpoint's weights (and, continuing its run, its
# state). With lora_rank or trainable set, only the adapters and what trainable names train.
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=vocab_size, dropout=dropout, padded_vocab_size=pad_vocab(vocab_size),
                  lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets)
weights = None
if ckpt is not None:
    problem = ds.mismatch(ckpt, ckpt_path, data_path, tokenizer, meta, new_run=reset_state)
    if problem:
        fail(problem)
    args, weights = ckpt['model_args'], ckpt['model']
    if not continuing and args.get('lora_rank'):
        fail(f"{ckpt_path} is a LoRA checkpoint; to build on it, export it merged "
             f"first (python export.py --ckpt={ckpt_path} --out=merged.safetensors)")
    if args['vocab_size'] != vocab_size:  # the data's tokenizer extends the checkpoint's
        weights = resize_vocab(weights, args['vocab_size'], vocab_size)
    else:  # padded_vocab_size: absent (None, unpadded) in checkpoints written before padding existed
        model_args['padded_vocab_size'] = args.get('padded_vocab_size')
try:
    model = GPT(check_args(model_args))  # a size that cannot fit in memory is refused before allocating
    if weights is not None:
        load_base(model, weights)  # the adapters, if any and not in weights, keep their init
    if lora_rank or trainable:
        mark_trainable(model, trainable, (tokenizer.get('extends') or {}).get('vocab_size'))
except ValueError as e:
    fail(e)
trained, total = count_params(model)
frozen = trained < total  # then checkpoints hold only what trains, and name the base they build on
model.gradient_checkpointing = gradient_checkpointing
model.to(device)
if fp8:  # before the optimizer and compile see the layers
    if fp8_problem(device):
        fail(fp8_problem(device))
    convert_to_fp8(model)
optimizers = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), device_type, optimizer)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
iter_num, pos, best_val_loss, wandb_id, last_eval, run_seconds = 0, (0, 0), float('inf'), None, {}, 0.0
last_epoch_ckpt = None  # iteration of the newest epoch_ checkpoint
if ckpt is not None and not reset_state:
    try:
        load_optimizer_state(optimizers[0], wte_moments(ckpt['optimizer'], optimizers[0], model, cut=False))
        for opt in optimizers[1:]:  # Muon's
            load_optimizer_state(opt, ckpt['muon'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        fail(f"{ckpt_path}: its optimizer state does not fit the model "
             f"({type(e).__name__}: {' '.join(str(e).split())})")
    if ckpt['scaler']:  # empty when the run was not float16; a fresh scaler then starts from its defaults
        scaler.load_state_dict(ckpt['scaler'])
    iter_num, pos, last_epoch_ckpt = ckpt['iter_num'], tuple(ckpt['data_pos']), ckpt.get('last_epoch_ckpt')
    best_val_loss, wandb_id = ckpt['best_val_loss'], ckpt.get('wandb_id')
    run_seconds = ckpt.get('wall_seconds', 0.0)  # the earlier processes' time, up to this checkpoint
    last_eval = {'train': ckpt['train_loss'], 'val': ckpt['val_loss']}
    # every rank's RNG (dropout) continues where it was; on another number of processes the ranks
    # beyond the saved ones keep seed + rank, so dropout masks (only they) differ from the old run
    rngs = ckpt.get('rng_ranks') or [ckpt['rng']]
    if rank < len(rngs):
        runs.set_rng_state(rngs[rank])
    if master_process:
        print(f"resumed from {ckpt_path} at iter {iter_num}, epoch {pos[0]}, window {pos[1]}/{n_windows}")
if ddp:  # each rank found its own start point: on node-local disks they can differ, and then the
    # ranks' collectives would not match and hang, so they compare what they loaded first
    starts = [None] * world_size
    dist.all_gather_object(starts, (iter_num, runs.identify(ckpt_path)))
    other = next((r for r, s in enumerate(starts) if s != starts[0]), None)
    if other is not None:
        fail(f"the ranks start from different points: rank 0 from {starts[0][1]} at iter "
             f"{starts[0][0]}, rank {other} from {starts[other][1]} at iter {starts[other][0]}; every "
             f"rank must see the same out_dir (a shared file system)")
if iter_num >= max_iters:  # a finished run, run again: it says so and starts nothing
    if master_process:
        print(f"the run in {out_dir} is complete (iter {iter_num}, max_iters={max_iters}); to train it further, "
              f"raise --max_iters")
    if ddp:
        dist.destroy_process_group()
    sys.exit(0)
if compile is None:
    compile = device_type == 'cuda'
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
if master_process:
    try:  # a checkpoint holds what trains and at most two moments of it (AdamW's; Muon keeps one)
        runs.prepare_out_dir(
            out_dir, new_run=not continuing,
            file_bytes=sum(p.numel() * p.element_size() * 3 for p in model.parameters() if p.requires_grad),
            files=runs.files_kept(max_iters - iter_num, ckpt_interval=ckpt_interval, save_best=save_best,
                                 rolling_interval=rolling_interval, keep_last=keep_last,
                                 epoch_iters=n_windows / windows_per_iter if save_epochs else None,
                                 keep_epochs=keep_epochs))
        if continuing:
            logs.trim(out_dir, iter_num)
        if frozen and not continuing:  # a run that saves only what trains keeps its base beside it
            base = runs.keep_base(out_dir, ckpt_path, ckpt)
    except (checkpoint.CheckpointError, logs.LogError) as e:
        fail(e)
ckpt = None  # free the loaded tensors
# never pruned: the file this run started from, and where a wsd decay begins (to extend the run from)
protect = tuple(p for p in (ckpt_path, wsd_start and os.path.join(out_dir, f'step_{wsd_start:07d}.safetensors')) if p)
writer = checkpoint.Writer(background=async_save)
try:
    log = logs.Log(config, iter_num, wandb_id, continuing, active=master_process)
except logs.LogError as e:
    fail(e)
# MFU: model FLOPs (6N + attention, see model.flops_per_token) per second over the hardware's peak
flops_per_token = raw_model.flops_per_token()
peak_flops = peak_flops or hardware.peak_flops(device, dtype)
if master_process:
    trains = f" ({trained:,} of all {total:,} trained: {100 * trained / total:.2f}%)" if frozen else ""
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters{trains}, {tokens_per_iter:,} tokens/iter, "
          f"{n_windows:,} windows/epoch, device {device}, dtype {dtype}, {world_size} process(es), "
          f"MFU against {f'{peak_flops / 1e12:.3g} TFLOP/s' if peak_flops else 'an unknown peak'}")
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
    """Both optimizers' learning rate at iteration it: a linear warmup, then wsd (constant until
    wsd_start, then 1 - sqrt to min_lr, which beat a linear decay in Hagele et al. 2024) or cosine."""
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    if lr_schedule == 'wsd' and it < wsd_start:
        return learning_rate
    if lr_schedule == 'wsd':
        return min_lr + (1 - math.sqrt((it - wsd_start) / (decay_iters - wsd_start))) * (learning_rate - min_lr)
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """Mean loss on the same fixed windows of each split every time, split across ranks. Whole
    batches only: a short last batch would make torch.compile recompile for its shape."""
    out = {}
    model.eval()
    for split, data in (('train', train_data), ('val', val_data)):
        n = (len(data) - 1) // block_size
        size = min(batch_size, n)  # a split smaller than one batch: one smaller batch
        windows = np.random.default_rng([seed, 2**31]).permutation(n)[:min(eval_iters, n // size) * size]
        total = torch.zeros(2, device=device)  # (sum of losses * windows, windows)
        for k, start in enumerate(range(0, len(windows), size)):
            if k % world_size == rank:
                x, y = get_batch(data, windows[start:start + size])
                with ctx:
                    _, loss = eval_model(x, y)
                total[0] += loss.float() * len(x)  # on the device: no copy to wait for
                total[1] += len(x)
        if ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def save(tiers):
    """Every rank: gather the RNG states; rank 0: hand the state to the writer, to be published under
    the tier names (it prints when the file is written). Returns the seconds training was blocked
    (left out of the iteration timing)."""
    rngs = [runs.rng_state()]
    if ddp:  # each rank's dropout stream, so a resumed run continues every one of them
        rngs = [None] * world_size if master_process else None
        dist.gather_object(runs.rng_state(), rngs, dst=0)
    if not master_process:
        return 0.0
    state = {  # a run with frozen weights saves what trains (and names its base); other runs, everything
        'model': trained_weights(raw_model) if frozen else raw_model.state_dict(), 'base': base,
        'optimizer': wte_moments(optimizers[0].state_dict(), optimizers[0], raw_model, cut=True),
        **({'muon': optimizers[1].state_dict()} if optimizers[1:] else {}), 'scaler': scaler.state_dict(),
        'iter_num': iter_num, 'epoch': pos[0], 'data_pos': list(pos), 'best_val_loss': best_val_loss,
        'last_epoch_ckpt': last_epoch_ckpt, 'val_loss': last_eval.get('val'), 'train_loss': last_eval.get('train'),
        'rng': rngs[0], 'rng_ranks': rngs, 'config': config, 'model_args': model_args, 'origin': start['origin'],
        'data': {'dataset': dataset, 'fingerprint': ds.fingerprint(meta)},
        'tokenizer': tokenizer, 'wandb_id': log.wandb_id, 'time': time.time(),
        'wall_seconds': run_seconds + time.time() - t_start,
    }
    try:
        return writer.save(out_dir, state, tiers, keep={'step': keep_last, 'epoch': keep_epochs}, protect=protect)
    except checkpoint.CheckpointError as e:
        fail(f"{e} (earlier checkpoints are intact)")


def run_eval():
    losses = estimate_loss()
    if master_process:
        print(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
              f"val ppl {math.exp(losses['val']):.2f}")
        entry = {'step': iter_num, 'epoch': pos[0], 'train_loss': losses['train'],
                 'val_loss': losses['val'], 'val_ppl': math.exp(losses['val'])}
        if eval_tokenizer:  # eval_mcq / eval_generate: the numbers evaluate.py gives, on the plain module
            raw_model.eval()
            with ctx:
                entry.update(metrics.training_metrics(raw_model, eval_tokenizer, eval_items, eval_prompt_list, seed=seed,
                                                      device=device, mcq_template=mcq_template, mcq_delimiter=mcq_delimiter))
            raw_model.train()
            print(f"eval {iter_num}: " + ', '.join(f"{k} {v:.3f}" for k, v in entry.items()
                                                   if k in metrics.TRAINING_KEYS))
        log.write(entry)
    return losses


window, log_losses, last_finite = [], [], None  # window: per-iteration losses not yet checked, on the device


def diverged(what):
    """Stop with one line when training produced a non-finite number, before that state is saved."""
    if master_process:
        writer.wait()  # the last good save completes; nothing later is saved
    last = f"{last_finite[1]:.4f} at iter {last_finite[0]}" if last_finite else "none yet"
    fail(f"{what} (last finite loss: {last}); nothing from it was saved. Likely "
         f"causes: learning_rate={learning_rate:g} too high, grad_clip={grad_clip:g}, float16 overflow "
         f"(try --dtype=bfloat16), or damaged data; the same command with a lower --learning_rate "
         f"continues from the last checkpoint")


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
# warm-up), leaving out evals and saves; the ETA's pace is the wall time of the last 10 log intervals
t0, timed, paces = time.time(), -1, deque(maxlen=11)
while iter_num < max_iters:
    lr = get_lr(iter_num)
    for group in (g for opt in optimizers for g in opt.param_groups):
        group['lr'] = lr
    windows, next_pos = ds.next_windows(pos, windows_per_iter, n_windows, seed)
    iter_loss = torch.zeros((), device=device)
    for micro in range(micro_steps):
        # rank r takes micro-batches r, r + world_size, ...: the global batch is the same on any world size
        k = micro * world_size + rank
        x, y = get_batch(train_data, windows[k * batch_size:(k + 1) * batch_size])
        if ddp:
            model.require_backward_grad_sync = micro == micro_steps - 1  # all-reduce once per iteration
        with ctx:
            _, loss = model(x, y)
            loss = loss / micro_steps
        scaler.scale(loss).backward()
        iter_loss += loss.detach()
    window.append(iter_loss)
    if grad_clip:  # the norm of all the gradients, each optimizer's unscaled first
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    for opt in optimizers:  # float16: each skips its step when its own gradients overflowed (torch's amp docs)
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    epoch_done = next_pos[0] > pos[0]
    iter_num, pos = iter_num + 1, next_pos
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
        dt = (time.time() - t0) / timed if timed > 0 else None  # None: only the warm-up iteration so far
        t0, timed = time.time(), 0
        tok_s = dt and tokens_per_iter / dt
        mfu = 100 * flops_per_token * tok_s / (peak_flops * world_size) if dt and peak_flops else None
        # this rank's peak GPU memory: what tensors used, and what the caching allocator held (nvidia-smi's view)
        mem = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30) \
            if device_type == 'cuda' else None
        if master_process:
            paces.append((time.time(), iter_num))
            (t_a, it_a), (t_b, it_b) = paces[0], paces[-1]
            left = (t_b - t_a) / (it_b - it_a) * (max_iters - iter_num) if it_b > it_a else 0.0
            eta = f"{left / 3600:.1f}h" if left >= 7200 else f"{left / 60:.1f}min" if left >= 60 else f"{left:.0f}s"
            speed = (f"{dt * 1000:.1f}ms, {tok_s / 1000:.1f}k tok/s, mfu {f'{mfu:.1f}%' if mfu else 'unknown'}, "
                     f"eta {eta}") if dt else "warm-up"
            print(f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {speed}" +
                  (f", {mem[0]:.1f} GiB ({mem[1]:.1f} reserved)" if mem else ""))
            log.write({'step': iter_num, 'epoch': pos[0], 'loss': lossf, 'ppl': math.exp(min(lossf, 50)), 'lr': lr,
                 'tokens_seen': iter_num * tokens_per_iter, 'ms_per_iter': dt and dt * 1000,
                 'tokens_per_sec': tok_s, 'mfu': mfu,
                 **({'peak_mem_gib': mem[0], 'peak_mem_reserved_gib': mem[1]} if mem else {})})

    best = False
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        t_eval = time.time()
        last_eval = run_eval()
        best = save_best and last_eval['val'] < best_val_loss
        best_val_loss = min(best_val_loss, last_eval['val'])
        t0 += time.time() - t_eval  # iteration timing leaves out evals

    stop = stop_signal is not None or log.error is not None  # a run that cannot log stops here, saving
    if ddp:  # every rank stops at the same iteration, whichever got the signal
        flag = torch.tensor(float(stop))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        stop = bool(flag)
    tiers = []  # the checkpoint tiers due now: one file, linked under each name
    if stop or (ckpt_interval and iter_num % ckpt_interval == 0) or iter_num == max_iters:
        tiers.append('latest')
    if rolling_interval and (iter_num % rolling_interval == 0 or iter_num == wsd_start):
        tiers.append(f'step_{iter_num:07d}')
    # epoch_ files at most once per rolling_interval: on a small corpus an epoch is a few iterations
    if epoch_done and save_epochs and (last_epoch_ckpt is None or iter_num - last_epoch_ckpt >= rolling_interval):
        tiers.append(f'epoch_{pos[0]:04d}')
        last_epoch_ckpt = iter_num
    if best:
        tiers.append('best')
    if tiers:
        log_losses += check_losses()  # a state whose loss or weights went non-finite is never saved
        if not torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all():
            diverged(f"the weights are not finite after iter {iter_num}")
        t0 += save(tiers)
    if stop:
        if master_process and log.error is None:
            name = signal.Signals(stop_signal).name if stop_signal else 'a signal on another rank'
            print(f"stopped by {name} at iter {iter_num}, saving {os.path.join(out_dir, 'latest.safetensors')}; "
                  f"resume with the same command: {runs.command_line()}", flush=True)
        break
if master_process:
    try:
        writer.wait()  # the last save (the final one, or a signal's) is on disk before the process ends
    except checkpoint.CheckpointError as e:
        fail(f"{e} (earlier checkpoints are intact)")
    if log.error:
        fail(f"{log.error}; stopped at iter {iter_num} with latest saved: fix it and run the same command to continue")

# -----------------------------------------------------------------------------
# the end: a summary of a finished run, loggers closed, ranks leave together
if master_process and max_iters <= iter_num > start_iter and last_eval.get('val') is not None:
    summary = {'iters': iter_num, 'epochs': pos[0] + pos[1] / n_windows,
               'final_val_loss': last_eval.get('val'), 'final_val_ppl': math.exp(last_eval['val']),
               'best_val_loss': best_val_loss, 'best_val_ppl': math.exp(best_val_loss),
               'tokens_seen': iter_num * tokens_per_iter, 'wall_seconds': run_seconds + time.time() - t_start,
               'wall_seconds_this_process': time.time() - t_start, 'config': config}
    try:
        logs.write_summary(out_dir, summary)
    except logs.LogError as e:
        fail(f"{e} (the run is complete: its checkpoints are saved)")
    print(f"done: val loss {summary['final_val_loss']:.4f} (best {best_val_loss:.4f}), "
          f"{summary['tokens_seen']:,} tokens in {summary['wall_seconds'] / 60:.1f} min")
try:
    log.close()
except logs.LogError as e:
    fail(e)
if ddp:
    dist.barrier()  # ranks leave together: gloo aborts a rank whose peer tears down mid-exit
    # the DDP wrapper holds the process group: freed first, gloo's worker threads end with the
    # group here, not at interpreter exit, where they can abort the process (SIGABRT)
    del model
    gc.collect()
    dist.destroy_process_group()
