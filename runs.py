"""
A run's life in its out_dir: what a command starts from, how a run starts, continues and ends, and
the files a training run keeps there besides the checkpoint tiers (checkpoint.py writes those) and
its logs (logs.py).

    find(init_from, out_dir)                  the model a command starts from: a checkpoint of a
                                               run, whole and checked, or another format's weights
    listing(out_dir)                          train.py --list: who trains there, and each checkpoint
    start_point(config, explicit, defaults)   train.py: continue the run in out_dir, start a new
                                               one, or refuse; and the config it runs with
    before_decay(...) / decay_start(...)      a longer wsd run continues from where its decay began
    lock(out_dir) / owner(out_dir)            one training process per out_dir
    prepare_out_dir(...) / keep_base(...)     before a run's first write
    planned_iters(config, n_windows)          the iterations a run trains (max_iters or max_epochs)
    check_config(config)                      train.py's config: values in range, settings agreeing
    identify(path) / check_same_start(...)    what ranks compare, and that they start alike
    command_line()                            the command that continues a run
    rng_state() / set_rng_state(tree)         every RNG training draws from

A training run's files in out_dir: the tiers (latest, latest_backup, best, step_*, epoch_*),
base.safetensors (the base a run with frozen weights builds on), log.jsonl (+ log.jsonl.dropped),
summary.json, tb/ (TensorBoard) and, while it trains, train.lock. Anything else there is the
user's and is never touched. A write that fails is one line (an Error) naming the file and the
OS's reason, and leaves the files that were there intact.
"""
import atexit
import fcntl
import functools
import json
import math
import os
import random
import re
import shlex
import shutil
import socket
import stat
import sys
import time
from dataclasses import fields

import numpy as np
import torch

import checkpoint
import interop
from configurator import check_ranges, fits
from dataset import KINDS, parse_mixture
from errors import Error, oneline, warn
from files import check_writable, fsync
from model import GPTConfig
from optim import CHOICES
from weights import check_state, with_base

# what a training run writes in out_dir besides its checkpoint tiers (checkpoint.tier_files)
RUN_FILES = re.compile(r"base\.safetensors|log\.jsonl(\.dropped)?|summary\.json|tb|\.ckpt-tmp-\d+")

# -----------------------------------------------------------------------------
# what a command starts from

def whole(state, path, defaults=None, bases=None) -> dict:
    """A checkpoint's state as the scripts use it, or Error(reason): an adapter state (one with a
    'base') completed with its base file's weights, checked to hold a GPT (weights.py), a tokenizer
    record, and for a training checkpoint (one with optimizers) the run's position and a config
    whose values have the types of `defaults` (train.py's). bases: a dict that keeps read bases,
    for callers reading many adapters of one base."""
    if not isinstance(state, dict):
        raise Error(f"unusable checkpoint (its state is a {type(state).__name__}, not a dict)")
    base = state.get("base") and _base(state["base"], path, {} if bases is None else bases)
    try:
        state = with_base(state, base) if base else state
        check_state(state)
    except Error as e:
        raise Error(f"unusable checkpoint ({e})") from None
    except Exception as e:  # a crafted state that still checksums; never a traceback
        raise Error(f"corrupt checkpoint ({type(e).__name__}: {oneline(e)})") from None
    tok = state.get("tokenizer")
    if not isinstance(tok, dict):
        raise Error("unusable checkpoint (no tokenizer)")
    if tok.get("kind") not in KINDS or not isinstance(tok.get("vocab_size"), int) \
            or not isinstance(tok.get("eot_id"), int) \
            or not isinstance(tok.get("fingerprint"), str):
        raise Error("unusable checkpoint (its tokenizer record is incomplete)")
    if "optimizer" in state:  # saved before optimizers had names: AdamW's, and Muon's beside it
        state["optimizers"] = {"adamw": state.pop("optimizer"),
                               **({"muon": state.pop("muon")} if "muon" in state else {})}
    if "optimizers" not in state:
        return state
    pos, opts, config = state.get("data_pos"), state["optimizers"], state.get("config")
    # (epoch, index), or one a dataset for a mixture
    positions = pos if isinstance(pos, list) and pos and isinstance(pos[0], list) else [pos]
    if not (isinstance(state.get("iter_num"), int) and state["iter_num"] >= 0
            and all(isinstance(p, list) and len(p) == 2
                    and all(isinstance(k, int) and k >= 0 for k in p) for p in positions)):
        raise Error("unusable checkpoint (its iteration or data position is not a count)")
    if not (isinstance(opts, dict)
            and all(isinstance(o, dict) and isinstance(o.get("state"), dict)
                    and isinstance(o.get("param_groups"), list) for o in opts.values())):
        raise Error("unusable checkpoint (its optimizer state is malformed)")
    if not isinstance(config, dict) or not isinstance(state.get("rng"), dict) \
            or not isinstance(state.get("data"), dict):
        raise Error("unusable checkpoint (no config, RNG state or data record)")
    for key, value in config.items():
        if defaults and key in defaults and not fits(value, defaults[key]):
            raise Error(f"unusable checkpoint (its config has {key}={value!r}, not a "
                        f"{type(defaults[key]).__name__})")
    return state


def _base(ref, path, bases):
    """The state of the base an adapter names: a file, relative to the adapter's folder, whose
    checksum must be ref['sha256']."""
    if not (isinstance(ref, dict) and isinstance(ref.get("path"), str)
            and isinstance(ref.get("sha256"), str)):
        raise Error("unusable checkpoint (its reference to a base is malformed)")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), ref["path"])
    try:
        sha = checkpoint.read_header(base_path)["checksum"]
    except Error as e:
        raise Error(f"its base {base_path} is missing or unreadable ({e}); this adapter needs "
                    f"that file") from None
    if sha != ref["sha256"]:
        raise Error(f"its base {base_path} is not the file it was trained on (sha256 {sha[:12]}, "
                    f"expected {ref['sha256'][:12]})")
    if (base_path, sha) not in bases:
        bases[(base_path, sha)] = checkpoint.load(base_path)
    return bases[(base_path, sha)]


def load(path) -> dict:
    """checkpoint.load(path), whole (an adapter with its base) and checked as find() checks it."""
    state = checkpoint.load(path)
    try:
        return whole(state, path)
    except Error as e:
        raise Error(f"cannot use {path}: {e}") from None


def find(init_from, out_dir, defaults=None):
    """(path, state): what train.py, sample.py, evaluate.py and export.py start from. init_from is
    'resume' (the newest usable checkpoint in out_dir: each damaged one skipped is a warning), a
    tier name or a path (checkpoint.resolve), or another format's weights (interop.NAMES: 'gpt2' ..
    'gpt2-xl', 'hf:DIR', 'nanogpt:PATH'), a state without training state. `defaults`: the training
    config's, whose types a training checkpoint's config must have."""
    check = functools.partial(whole, defaults=defaults, bases={})
    if init_from == "resume":
        if not has_run(out_dir):
            raise Error(f"no checkpoint in {out_dir} (train a model first: python prepare.py && "
                        f"python train.py; or name one)")
        path, state, skipped = checkpoint.find_resume(out_dir, check)
        for reason in skipped:
            warn(reason)
        return path, state
    if interop.NAMES.fullmatch(os.fspath(init_from)):
        path, state = interop.load(init_from)
        try:  # the model check our checkpoints pass (interop checked model_args before allocating)
            check_state(state)
        except Error as e:
            raise Error(f"cannot use {init_from}: {e}") from None
        return path, state
    path = checkpoint.resolve(init_from, out_dir)
    state = checkpoint.load(path)
    try:
        return path, check(state, path)
    except Error as e:
        raise Error(f"cannot use {path}: {e}") from None


def listing(out_dir, defaults=None) -> str:
    """train.py --list: who trains in out_dir now, and the table of its checkpoints, each verified
    and checked as find() does."""
    if not os.path.isdir(out_dir):
        raise Error(f"out_dir {out_dir!r} is not a folder: no run to list (set --out_dir)")
    check = functools.partial(whole, defaults=defaults, bases={})
    held = owner(out_dir)
    table = checkpoint.format_listing(checkpoint.list_checkpoints(out_dir, check=check))
    return (f"in use by {held}\n" if held else "") + table


def identify(path) -> str:
    """What a run starts from, for ranks to compare: a checkpoint file with the sha256 it records, a
    name (gpt2, hf:DIR), or 'scratch'."""
    if path is None:
        return "scratch"
    try:
        return f"{path} (sha256 {checkpoint.read_header(path)['checksum'][:12]})"
    except Error:
        return str(path)


def check_same_start(iter_num, path, world_size):
    """Error unless every rank starts from the same point (under DDP, after loading): on node-local
    disks they can differ, and then the ranks' collectives would not match and hang."""
    import torch.distributed as dist
    starts = [None] * world_size
    dist.all_gather_object(starts, (iter_num, identify(path)))
    other = next((r for r, s in enumerate(starts) if s != starts[0]), None)
    if other is not None:
        raise Error(f"the ranks start from different points: rank 0 from {starts[0][1]} at iter "
                    f"{starts[0][0]}, rank {other} from {starts[other][1]} at iter "
                    f"{starts[other][0]}; every rank must see the same out_dir "
                    f"(a shared file system)")


def command_line() -> str:
    """The command that started this process, to print as the one that continues the run: python
    train.py ARGS, or under torchrun its own line with its flags as given (the parent process's
    command line, on Linux; else torchrun --nproc_per_node=N), without the flags that start anew."""
    argv = [a for a in sys.argv if not a.startswith(("--overwrite", "--init_from=scratch"))]
    if "LOCAL_WORLD_SIZE" not in os.environ:  # not under torchrun
        return shlex.join(["python", *argv])
    launcher = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [a.decode() for a in f.read().split(b"\0") if a]
        i = parent.index(sys.argv[0])  # torchrun passes the script as it was given
        if os.path.basename(parent[1]) == "torchrun":  # python .../bin/torchrun FLAGS script
            launcher = ["torchrun", *parent[2:i]]
        elif parent[1:3] == ["-m", "torch.distributed.run"]:
            launcher = ["python", *parent[1:i]]
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    return shlex.join([*launcher, *argv])


def has_run(out_dir) -> bool:
    """Whether out_dir holds checkpoints (valid or not) of a run."""
    return bool(checkpoint.tier_files(out_dir))


def in_dir(init_from, out_dir) -> bool:
    """Whether init_from names a checkpoint of out_dir's own run: a tier name, or a path in
    out_dir."""
    init_from = os.fspath(init_from)
    if interop.NAMES.fullmatch(init_from):
        return False
    if checkpoint.NAME.fullmatch(init_from.removesuffix(".safetensors")):
        return True
    path = os.path.realpath(init_from)
    return (path if os.path.isdir(path) else os.path.dirname(path)) == os.path.realpath(out_dir)

# -----------------------------------------------------------------------------
# train.py's config

# train.py's keys that take a number from an interval
RANGES = dict(
    n_layer='[1, inf)', n_head='[1, inf)', n_embd='[1, inf)', block_size='[1, inf)',
    dropout='[0, 1)', batch_size='[1, inf)', gradient_accumulation_steps='[1, inf)',
    max_iters='[1, inf)', max_epochs='(0, inf)', learning_rate='(0, inf)', weight_decay='[0, inf)',
    beta1='[0, 1)', beta2='[0, 1)', grad_clip='[0, inf)', warmup_iters='[0, inf)',
    lr_decay_iters='[1, inf)', min_lr='[0, inf)', log_interval='[1, inf)', eval_interval='[1, inf)',
    eval_iters='[1, inf)', ckpt_interval='[0, inf)', rolling_interval='[0, inf)',
    keep_last='[0, inf)', keep_epochs='[0, inf)', seed='[0, 2147483647]', peak_flops='(0, inf)',
    lora_rank='[0, inf)', lora_alpha='(0, inf)', lora_dropout='[0, 1)', dist_timeout='[1, inf)',
    decay_frac='(0, 1]')


def check_config(c, where=''):
    """Error unless train.py's config c holds together: each value in its RANGES interval, and no
    setting that contradicts another. Checked for the whole config: files, the command line, and a
    checkpoint's (where: ' (in the config of PATH)')."""
    check_ranges(c, RANGES, where)
    if c['n_embd'] % c['n_head']:
        raise Error(f"n_embd={c['n_embd']} must be a multiple of n_head={c['n_head']}{where}")
    for key, allowed in (('optimizer', CHOICES), ('lr_schedule', ('wsd', 'cosine')),
                         ('loss_tokens', ('flagged', 'all'))):
        if c[key] not in allowed:
            raise Error(f"{key}={c[key]!r} must be one of {', '.join(allowed)}{where}")
    if c['min_lr'] > c['learning_rate']:
        raise Error(f"min_lr={c['min_lr']:g} is above learning_rate={c['learning_rate']:g}: the "
                    f"decay would raise the rate{where}; set min_lr at most learning_rate")
    if not c['out_dir']:
        raise Error("out_dir is empty (name a folder, e.g. --out_dir=out)")
    trains = [name for name, _ in parse_mixture(c['dataset'])]
    for name in eval_names(c['eval_datasets']):
        if name in trains:
            raise Error(f"eval_datasets names {name}, which the run trains on: its val loss is "
                        f"logged already{where}")
    GPTConfig(lora_rank=c['lora_rank'], lora_targets=c['lora_targets'])  # an Error for bad targets

def eval_names(spec) -> list:
    """The dataset names of eval_datasets ('a,b'), each once."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise Error(f"eval_datasets={spec!r} names {', '.join(twice)} twice")
    return names

# -----------------------------------------------------------------------------
# how a training run starts or continues

# what a checkpoint's weights fix: every GPTConfig field but those a new run from them chooses
# itself (the vocabulary, from its data; dropout; adapters, whose rank and targets a run that
# continues keeps)
FREE = ("vocab_size", "padded_vocab_size", "dropout", "lora_rank", "lora_alpha", "lora_dropout",
        "lora_targets")
SHAPE = tuple(f.name for f in fields(GPTConfig) if f.name not in FREE)
# what a run saved before these keys existed trained with (the defaults have changed since)
EARLIER = {"optimizer": "adamw", "lr_schedule": "cosine"}


def start_point(config, explicit, defaults) -> dict:
    """What a training command starts from and the config it runs with; Error(reason) when it must
    not start. The same command line starts a run and, after a crash, a Ctrl-C or a requeue,
    continues it: init_from 'auto' resumes the run in out_dir (its checkpoints) when there is one. A
    new run (scratch, or another checkpoint's weights) into an out_dir that holds a run is refused,
    unless overwrite (prepare_out_dir then moves the old run aside) or unless this very command
    started that run (its checkpoints' origin), which is then continued: a requeued fine-tune.

    Returns {init_from (as decided), path, state (None from scratch), continuing, origin (how the
    run began, kept in its checkpoints), config}. A continued run's config is its checkpoint's, with
    the keys this command sets (`explicit`) on top; a new run from a checkpoint takes only its
    shape."""
    init_from, out_dir, overwrite = config["init_from"], config["out_dir"], config["overwrite"]
    reset_state = config["reset_state"]
    if init_from == "auto":
        init_from = "resume" if has_run(out_dir) and not overwrite else "scratch"
    continuing = init_from == "resume" or (init_from != "scratch" and not reset_state
                                           and in_dir(init_from, out_dir))
    origin = None if init_from == "scratch" else f"{init_from} reset_state={reset_state}"
    if continuing and overwrite:
        raise Error(f"--overwrite=True starts a new run and --init_from={init_from} continues the "
                    f"one in {out_dir}: choose one")
    path = state = None
    if not continuing and has_run(out_dir) and not overwrite:
        path, state = find("resume", out_dir, defaults)
        if init_from == "scratch" or state.get("origin") != origin:
            raise Error(f"{out_dir} holds a run ({os.path.basename(path)} at iter "
                        f"{state['iter_num']}); continue it by leaving out --init_from, start over "
                        f"with --overwrite=True (moves it to {out_dir}/previous-*/), or use "
                        f"another --out_dir")
        print(f"{out_dir} holds the run this command started from {init_from}: continuing it")
        continuing = True
    elif init_from != "scratch":
        path, state = find(init_from, out_dir, defaults)
    if state is None:
        return dict(init_from=init_from, path=None, state=None, continuing=False, origin=origin,
                    config=dict(config, init_from=init_from))
    args = state["model_args"]
    # an adapter's shape too, when continuing
    for k in SHAPE + (("lora_rank", "lora_targets") if continuing else ()):
        if k in explicit and config[k] != args.get(k, defaults[k]):
            raise Error(f"{path} has {k}={args.get(k, defaults[k])} but --{k}={config[k]} was "
                        f"given (a checkpoint's shape cannot change)")
    if continuing and "optimizers" not in state:
        raise Error(f"{path} holds weights only (export.py wrote it), no run to continue; start a "
                    f"new run from it with --reset_state=True")
    if continuing:
        state["config"] = {**EARLIER, **state["config"]}
        was = state["config"]["optimizer"]
        # its state is the other optimizer's
        if "optimizer" in explicit and config["optimizer"] != was:
            raise Error(f"{path} was trained with optimizer={was} and "
                        f"--optimizer={config['optimizer']} cannot continue its state; leave it "
                        f"out, or start a new run from its weights (--init_from={path} "
                        f"--reset_state=True and another --out_dir)")
    # weights only (export.py, gpt2, hf:, nanogpt:) start a new run; a continued run never resets
    reset_state = "optimizers" not in state or (reset_state and not continuing)
    if reset_state:  # a new run keeps only the weights, and so their shape
        config = dict(config, **{k: args.get(k, defaults[k]) for k in SHAPE if k not in explicit})
    else:  # the run's own config; how this command starts (init_from, ...) is not the run's to set
        ours = explicit | {"init_from", "reset_state", "overwrite"}
        config = dict(config, **{k: v for k, v in state["config"].items()
                                 if k in defaults and k not in ours})
    return dict(init_from=init_from, path=path, state=state, continuing=continuing,
                origin=state.get("origin") if continuing else origin,
                config=dict(config, init_from=init_from, reset_state=reset_state))


# a wsd run's rate is constant until its decay begins, whatever max_iters is: a finished run given a
# higher max_iters continues from the step_ checkpoint train.py saved there, exactly the run planned
# that long from the start, where continuing from its end would re-warm annealed weights (Hagele et
# al. 2024, https://arxiv.org/abs/2405.18392, sec. 3)
def decay_start(c, n_windows):
    """The iteration where the wsd decay of a run with config c begins (n_windows: as for
    planned_iters); None for cosine."""
    if c["lr_schedule"] != "wsd":
        return None
    end = c["lr_decay_iters"] or planned_iters(c, n_windows)
    return end - round(c["decay_frac"] * end)


def planned_iters(c, n_windows) -> int:
    """The iterations a run with config c trains: max_iters, or fewer when max_epochs ends it first
    (n_windows: windows an epoch of its first dataset takes of the training order, its windows over
    its share of a mixture)."""
    if c["max_epochs"] is None:
        return c["max_iters"]
    windows_per_iter = c["batch_size"] * c["gradient_accumulation_steps"]
    return min(c["max_iters"], math.ceil(c["max_epochs"] * n_windows / windows_per_iter))


def before_decay(path, state, config, n_windows, defaults, verbose=True):
    """(path, state) to continue a run from: the step_ checkpoint where its decay began when config
    moves the decay later than where the run is (a longer run), else the given ones. Without that
    file it warns and continues from the given state."""
    began, start = decay_start(state["config"], n_windows), decay_start(config, n_windows)
    if began is None or start is None or began >= min(start, state["iter_num"]):
        return path, state
    try:
        step_path, step = find(f"step_{began}", os.path.dirname(path), defaults)
    except Error as e:
        if verbose:
            warn(f"the decay of {path} began at iter {began} and no checkpoint from there is "
                 f"usable ({e}); continuing from iter {state['iter_num']}, the learning rate "
                 f"back up")
        return path, state
    if verbose:
        print(f"extending a run whose decay began at iter {began}: continuing from {step_path}, "
              f"saved there (best keeps the decayed weights until this run beats them)")
    # the decay's weights are dropped, not its time or its best
    return step_path, dict(step, best_val_loss=min(step["best_val_loss"], state["best_val_loss"]),
                           wall_seconds=state.get("wall_seconds", 0.0))

# -----------------------------------------------------------------------------
# one owner per out_dir: two processes training into one folder would each rotate, prune and
# trim the other's files (a double-submitted job, a requeue while the old job still runs)

LOCK = "train.lock"
_held = []  # (fd, path) of the lock this process holds, for its whole life


def lock(out_dir):
    """Make this process out_dir's only trainer: an exclusive flock on out_dir/train.lock, which the
    kernel releases when the process ends, however it ends (the file a killed owner leaves is only a
    note). The file holds the owner's pid, host, start time and command; Error naming them when
    another process holds it, and for a train.lock that is not a note of ours (a link, a folder, a
    file with other content), which is never written. Removed at a normal exit."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise Error(f"out_dir {out_dir!r} is a file, not a folder")
    path, created = os.path.join(out_dir, LOCK), not os.path.exists(out_dir)
    deadline = time.time() + 1.0  # `train.py --list` probes the lock for an instant
    try:
        os.makedirs(out_dir, exist_ok=True)
        while True:
            fd = _open_note(path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.time() > deadline:
                    raise Error(f"{out_dir} is in use by {owner(out_dir)}; wait for it to end or "
                                f"stop it (its Ctrl-C or SIGTERM saves), or use another "
                                f"--out_dir") from None
                time.sleep(0.05)
                continue
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            # its owner removed it on exit between our open and flock: take the new one
            os.close(fd)
        note = os.read(fd, 4096)
        if note.strip() and _parse_note(note) is None:
            os.close(fd)
            raise Error(f"{path} is not a lock note of train.py's; move it away "
                        f"(it is left as it is)")
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    started=time.strftime("%Y-%m-%d %H:%M:%S"), command=shlex.join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as e:
        raise Error(f"cannot write to out_dir {out_dir!r} ({LOCK}): {oneline(e)}") from None
    _held.append((fd, path, created))
    atexit.register(unlock)
    old = _parse_note(note)
    if old and old.get("host") == info["host"] and _alive_trainer(old.get("pid")):
        warn(f"{path} names pid {old['pid']} on this host, still running, yet its lock did not "
             f"hold: file locks do not work on this file system (some NFS setups); make sure no "
             f"other training process writes into {out_dir}")


def _open_note(path, flags):
    """The lock file's descriptor, opened without following a link: Error unless it is a regular
    file of one name (a link to another file would have that file overwritten)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError:
        if os.path.islink(path):
            raise Error(f"{path} is a symbolic link, not train.py's lock note; remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise Error(f"{path} is not train.py's lock note "
                    f"({'a hard link' if stat.S_ISREG(st.st_mode) else 'not a file'}); remove it")
    return fd


def unlock():
    """Release out_dir (lock() has this done at exit). The file goes first, then the lock: a process
    that opened it meanwhile sees it gone and retries. An out_dir this process made and left empty
    (it stopped before writing) goes too."""
    for fd, path, created in _held:
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.remove(path)
            if created:
                os.rmdir(os.path.dirname(path))  # only if empty
        except OSError:
            # not empty, or a read-only or vanished out_dir: the kernel still releases the lock
            pass
        os.close(fd)
    _held.clear()


def owner(out_dir):
    """Who holds out_dir's lock ('pid 4242 on host h since 2026-11-30 02:41:07: train.py ...'),
    or None when no process does."""
    path = os.path.join(out_dir, LOCK)
    try:
        fd = _open_note(path, os.O_RDONLY)
    except (OSError, Error):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # free: a note left by a killed owner
        except BlockingIOError:
            info = _parse_note(os.read(fd, 4096))
    finally:
        os.close(fd)
    if not info:
        return "another process (it recorded no details)"
    return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}: "
            f"{info.get('command')}")


def _parse_note(data):
    try:
        info = json.loads(data.decode())
        return info if isinstance(info, dict) and "pid" in info else None
    except ValueError:
        return None


def _alive_trainer(pid):
    """Whether pid is a live process of this host running train.py."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return int(pid) != os.getpid() and b"train.py" in f.read()
    except (OSError, TypeError, ValueError):
        return False

# -----------------------------------------------------------------------------
# out_dir before the first write

def files_kept(iters, tiers) -> int:
    """How many checkpoint files the tiers can hold at once over the next `iters` iterations. tiers:
    {name: (every, keep)}, a tier saved at most every `every` iterations (0: never) whose newest
    `keep` files are kept (0: all). An upper bound: one save under several names is one file."""
    return sum(min(int(iters // every), keep or iters) for every, keep in tiers.values() if every)


def prepare_out_dir(out_dir, *, new_run, file_bytes, files):
    """Before a run's first write into out_dir: it must take files; for a new run, what an older
    run left there moves aside (move_aside); and `files` checkpoints (files_kept) of file_bytes each
    should fit on its disk beside what is there: a warning if they may not, an Error if not even one
    save fits (it needs a scratch copy too). Warn now, not hours into a run."""
    check_writable(out_dir, "out_dir")
    moved = move_aside(out_dir) if new_run else None
    if moved:
        print(f"moved what was in {out_dir} to {moved}")
    free = shutil.disk_usage(out_dir).free
    have = checkpoint.disk_bytes(checkpoint.tier_files(out_dir).values())  # replaced, not added to
    if free < 2 * file_bytes:
        raise Error(f"cannot save a checkpoint: one takes {file_bytes / 1e9:.1f} GB (twice that "
                    f"while it is written) and {out_dir} has {free / 1e9:.1f} GB free; free space "
                    f"or use another --out_dir")
    need = files * file_bytes + file_bytes - have
    if need > free:
        warn(f"the checkpoint tiers may need {need / 1e9:.1f} GB ({files} files of "
             f"{file_bytes / 1e9:.1f} GB) and {out_dir} has {free / 1e9:.1f} GB free; lower "
             f"keep_last / keep_epochs or raise rolling_interval, or free space")


def move_aside(out_dir) -> str:
    """Move what a run wrote in out_dir (its tiers and RUN_FILES; nothing else, whatever else is
    there) into out_dir/previous-<time>/, never deleted; returns that folder, or None if there was
    nothing."""
    names = [os.path.basename(p) for p in checkpoint.tier_files(out_dir).values()]
    if os.path.isdir(out_dir):
        names += [n for n in sorted(os.listdir(out_dir)) if RUN_FILES.fullmatch(n)]
    if not names:
        return None
    dest = os.path.join(out_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    while os.path.exists(dest):
        dest += "+"
    try:
        os.mkdir(dest)
        for n in names:
            os.rename(os.path.join(out_dir, n), os.path.join(dest, n))
        fsync(out_dir)
    except OSError as e:  # renames only: every file is whole, in out_dir or in dest
        raise Error(f"cannot move the old run in {out_dir} aside to {dest}: {oneline(e)}") from None
    return dest


def keep_base(out_dir, path, state) -> dict:
    """A run with frozen weights saves only what trains, so its base must stay exactly as it was:
    out_dir/base.safetensors, a hard link of the file it started from (no copy, and replacing that
    file later, like a newer best, cannot change it), else written from state. Returns the
    reference a checkpoint of the run stores: {'path', 'sha256'}."""
    dest = os.path.join(out_dir, "base.safetensors")
    try:
        if os.path.exists(dest):
            os.remove(dest)
        try:
            # one of our files (an Error for gpt2, hf:, nanogpt: names)
            checkpoint.read_header(path)
            os.link(path, dest)
        except (OSError, Error):  # another filesystem, or gpt2 / hf: / nanogpt: weights
            checkpoint.save(dest, {k: state[k] for k in ("model", "model_args", "tokenizer")
                                   if k in state})
    except OSError as e:
        raise Error(f"cannot keep the base of this run as {dest}: {oneline(e)}") from None
    return {"path": "base.safetensors", "sha256": checkpoint.read_header(dest)["checksum"]}

# -----------------------------------------------------------------------------
# RNG state

def rng_state() -> dict:
    """Every RNG training draws from, as a checkpointable tree (under DDP: this rank's)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            # this process's GPU only: get_rng_state_all() would create a context on every GPU
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else []}


def set_rng_state(tree: dict) -> None:
    version, mt, gauss = tree["python"]
    random.setstate((version, tuple(mt), gauss))
    n = tree["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tree["torch"])
    if tree.get("cuda") and torch.cuda.is_initialized():
        # the current device's (older files: GPU 0's, rank 0's)
        torch.cuda.set_rng_state(tree["cuda"][0])
