"""
A run's life in its out_dir: what a command starts from, how a run starts, continues and ends, and
the files a training run keeps there besides the checkpoint tiers (checkpoint.py writes those) and
its logs (logs.py).

    find(init_from, out_dir) / find_or_exit(...)  the model a command starts from: a checkpoint of a
                                                   run, whole and checked, or another format's weights
    listing(out_dir)                              train.py --list: who trains there, and each checkpoint
    start_point(config, explicit, defaults)       train.py: continue the run in out_dir, start a new
                                                   one, or refuse; and the config it runs with
    before_decay(...) / decay_start(...)          a longer wsd run continues from where its decay began
    lock(out_dir) / owner(out_dir)                one training process per out_dir
    prepare_out_dir(...) / keep_base(...)         before a run's first write
    identify(path) / command_line()               what ranks compare; the command that continues a run
    rng_state() / set_rng_state(tree)             every RNG training draws from
    check_output(path, what)                      any script's output path, before its work

A training run's files in out_dir: the tiers (latest, latest_backup, best, step_*, epoch_*),
base.safetensors (the base a run with frozen weights builds on), log.jsonl (+ log.jsonl.dropped),
summary.json, tb/ (TensorBoard) and, while it trains, train.lock. Anything else there is the
user's and is never touched. A write that fails is one line (CheckpointError) naming the file and
the OS's reason, and leaves the files that were there intact.
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

import numpy as np
import torch

import checkpoint
import interop
from checkpoint import CheckpointError, oneline
from configurator import fits
from dataset import KINDS
from model import check_state, with_base

# what a training run writes in out_dir besides its checkpoint tiers (checkpoint.tier_files)
RUN_FILES = re.compile(r"base\.safetensors|log\.jsonl(\.dropped)?|summary\.json|tb|\.ckpt-tmp-\d+")

# -----------------------------------------------------------------------------
# what a command starts from

def whole(state, path, defaults=None, bases=None) -> dict:
    """A checkpoint's state as the scripts use it, or CheckpointError(reason): an adapter state
    (one with a 'base') completed with its base file's weights, checked to hold a GPT (model.py),
    a tokenizer record, and for a training checkpoint (one with an optimizer) the run's position and
    a config whose values have the types of `defaults` (train.py's). bases: a dict that keeps read
    bases, for callers reading many adapters of one base."""
    if not isinstance(state, dict):
        raise CheckpointError(f"unusable checkpoint (its state is a {type(state).__name__}, not a dict)")
    try:
        if isinstance(state.get("base"), dict):
            state = with_base(state, _base(state["base"], path, {} if bases is None else bases))
        check_state(state)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"unusable checkpoint ({e})") from None
    except Exception as e:  # a crafted state that still checksums; never a traceback
        raise CheckpointError(f"corrupt checkpoint ({type(e).__name__}: {oneline(e)})") from None
    tok = state.get("tokenizer")
    if not isinstance(tok, dict):
        raise CheckpointError("unusable checkpoint (no tokenizer)")
    if tok.get("kind") not in KINDS or not isinstance(tok.get("vocab_size"), int) \
            or not isinstance(tok.get("eot_id"), int) or not isinstance(tok.get("fingerprint"), str):
        raise CheckpointError("unusable checkpoint (its tokenizer record is incomplete)")
    if "optimizer" not in state:
        return state
    pos, opt, config = state.get("data_pos"), state["optimizer"], state.get("config")
    if not (isinstance(state.get("iter_num"), int) and state["iter_num"] >= 0 and isinstance(pos, list)
            and len(pos) == 2 and all(isinstance(p, int) and p >= 0 for p in pos)):
        raise CheckpointError("unusable checkpoint (its iteration or data position is not a count)")
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise CheckpointError("unusable checkpoint (its optimizer state is malformed)")
    if not isinstance(config, dict) or not isinstance(state.get("rng"), dict) or not isinstance(state.get("data"), dict):
        raise CheckpointError("unusable checkpoint (no config, RNG state or data record)")
    for key, value in config.items():
        if defaults and key in defaults and not fits(value, defaults[key]):
            raise CheckpointError(f"unusable checkpoint (its config has {key}={value!r}, not a "
                                  f"{type(defaults[key]).__name__})")
    return state


def _base(ref, path, bases):
    """The state of the base an adapter names: a file, relative to the adapter's folder, whose
    checksum must be ref['sha256']."""
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), ref["path"])
    try:
        sha = checkpoint.read_header(base_path)["checksum"]
    except CheckpointError as e:
        raise CheckpointError(f"its base {base_path} is missing or unreadable ({e}); this adapter needs that file")
    if sha != ref["sha256"]:
        raise CheckpointError(f"its base {base_path} is not the file it was trained on (sha256 {sha[:12]}, "
                              f"expected {ref['sha256'][:12]})")
    if (base_path, sha) not in bases:
        bases[(base_path, sha)] = checkpoint.load(base_path)
    return bases[(base_path, sha)]


def load(path) -> dict:
    """checkpoint.load(path), whole (an adapter with its base) and checked as find() checks it."""
    state = checkpoint.load(path)
    try:
        return whole(state, path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot use {path}: {e}") from None


def find(init_from, out_dir, defaults=None):
    """(path, state, skipped): what train.py, sample.py, evaluate.py and export.py start from. init_from
    is 'resume' (the newest usable checkpoint in out_dir, skipping damaged ones: skipped says which
    and why), a tier name or a path (checkpoint.resolve), or another format's weights (interop.NAMES:
    'gpt2' .. 'gpt2-xl', 'hf:DIR', 'nanogpt:PATH'), a state without training state.
    `defaults`: the training config's, whose types a training checkpoint's config must have."""
    check = functools.partial(whole, defaults=defaults, bases={})
    if init_from == "resume":
        return checkpoint.find_resume(out_dir, check)
    if interop.NAMES.fullmatch(os.fspath(init_from)):
        try:
            path, state = interop.load(init_from)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        try:  # the model check our checkpoints pass (interop checked model_args before allocating)
            check_state(state)
        except ValueError as e:
            raise CheckpointError(f"cannot use {init_from}: {e}") from None
        return path, state, []
    path = checkpoint.resolve(init_from, out_dir)
    state = checkpoint.load(path)
    try:
        return path, check(state, path), []
    except CheckpointError as e:
        raise CheckpointError(f"cannot use {path}: {e}") from None


def find_or_exit(init_from, out_dir, prog, hint='', defaults=None):
    """find() for scripts: (path, state); the files it skipped are warnings on stderr, and failure
    is one line and exit status 1."""
    try:
        path, state, skipped = find(init_from, out_dir, defaults)
    except CheckpointError as e:
        raise SystemExit(f"{prog}: error: {e}{'' if interop.NAMES.fullmatch(os.fspath(init_from)) else hint}") from None
    for reason in skipped:
        print(f"warning: {reason}", file=sys.stderr)
    return path, state


def listing(out_dir, defaults=None) -> str:
    """train.py --list: who trains in out_dir now, and the table of its checkpoints, each verified
    and checked as find() does."""
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
    except CheckpointError:
        return str(path)


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
    """Whether init_from names a checkpoint of out_dir's own run: a tier name, or a path in out_dir."""
    init_from = os.fspath(init_from)
    if interop.NAMES.fullmatch(init_from):
        return False
    if checkpoint.NAME.fullmatch(init_from.removesuffix(".safetensors")):
        return True
    path = os.path.realpath(init_from)
    return (path if os.path.isdir(path) else os.path.dirname(path)) == os.path.realpath(out_dir)

# -----------------------------------------------------------------------------
# how a training run starts or continues

SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias")  # what a checkpoint's weights fix
# what a run saved before these keys existed trained with (the defaults have changed since)
EARLIER = {"optimizer": "adamw", "lr_schedule": "cosine"}


def start_point(config, explicit, defaults) -> dict:
    """What a training command starts from and the config it runs with; CheckpointError(reason) when
    it must not start. The same command line starts a run and, after a crash, a Ctrl-C or a requeue,
    continues it: init_from 'auto' resumes the run in out_dir (its checkpoints) when there is one. A new
    run (scratch, or another checkpoint's weights) into an out_dir that holds a run is refused, unless
    overwrite (prepare_out_dir then moves the old run aside) or unless this very command started that
    run (its checkpoints' origin), which is then continued: a requeued fine-tune.

    Returns {init_from (as decided), path, state (None from scratch), continuing, origin (how the run
    began, kept in its checkpoints), config}. A continued run's config is its checkpoint's, with the
    keys this command sets (`explicit`) on top; a new run from a checkpoint takes only its shape."""
    init_from, out_dir, overwrite = config["init_from"], config["out_dir"], config["overwrite"]
    reset_state = config["reset_state"]
    if init_from == "auto":
        init_from = "resume" if has_run(out_dir) and not overwrite else "scratch"
    continuing = init_from == "resume" or (init_from != "scratch" and not reset_state and in_dir(init_from, out_dir))
    origin = None if init_from == "scratch" else f"{init_from} reset_state={reset_state}"
    if continuing and overwrite:
        raise CheckpointError(f"--overwrite=True starts a new run and --init_from={init_from} continues the one "
                              f"in {out_dir}: choose one")
    path = state = None
    if not continuing and has_run(out_dir) and not overwrite:
        path, state, skipped = find("resume", out_dir, defaults)
        if init_from == "scratch" or state.get("origin") != origin:
            raise CheckpointError(f"{out_dir} holds a run ({os.path.basename(path)} at iter {state['iter_num']}); "
                                  f"continue it by leaving out --init_from, start over with --overwrite=True "
                                  f"(moves it to {out_dir}/previous-*/), or use another --out_dir")
        print(f"{out_dir} holds the run this command started from {init_from}: continuing it")
        continuing = True
    elif init_from != "scratch":
        path, state, skipped = find(init_from, out_dir, defaults)
    if state is None:
        return dict(init_from=init_from, path=None, state=None, continuing=False, origin=origin,
                    config=dict(config, init_from=init_from))
    for reason in skipped:
        print(f"warning: {reason}", file=sys.stderr)
    args = state["model_args"]
    for k in SHAPE + (("lora_rank", "lora_targets") if continuing else ()):  # an adapter's shape too
        if k in explicit and config[k] != args.get(k, defaults[k]):
            raise CheckpointError(f"{path} has {k}={args.get(k, defaults[k])} but --{k}={config[k]} was given "
                                  f"(a checkpoint's shape cannot change)")
    if continuing and "optimizer" not in state:
        raise CheckpointError(f"{path} holds weights only (export.py wrote it), no run to continue; start a new "
                              f"run from it with --reset_state=True")
    if continuing:
        state["config"] = {**EARLIER, **state["config"]}
        was = state["config"]["optimizer"]
        if "optimizer" in explicit and config["optimizer"] != was:  # its state is the other optimizer's
            raise CheckpointError(f"{path} was trained with optimizer={was} and --optimizer={config['optimizer']} "
                                  f"cannot continue its state; leave it out, or start a new run from its weights "
                                  f"(--init_from={path} --reset_state=True and another --out_dir)")
    # weights only (export.py, gpt2, hf:, nanogpt:) start a new run; a continued run never resets
    reset_state = "optimizer" not in state or (reset_state and not continuing)
    if reset_state:  # a new run keeps only the weights, and so their shape
        config = dict(config, **{k: args[k] for k in SHAPE if k not in explicit})
    else:  # the run's own config; how this command starts (init_from, ...) is not the run's to set
        ours = explicit | {"init_from", "reset_state", "overwrite"}
        config = dict(config, **{k: v for k, v in state["config"].items() if k in defaults and k not in ours})
    return dict(init_from=init_from, path=path, state=state, continuing=continuing,
                origin=state.get("origin") if continuing else origin,
                config=dict(config, init_from=init_from, reset_state=reset_state))


# a wsd run's rate is constant until its decay begins, whatever max_iters is: a finished run given a
# higher max_iters continues from the step_ checkpoint train.py saved there, exactly the run planned
# that long from the start, where continuing from its end would re-warm annealed weights (Hagele et
# al. 2024, https://arxiv.org/abs/2405.18392, sec. 3)
def decay_start(c, n_windows):
    """The iteration where the wsd decay of a run with config c begins (n_windows: per epoch, for
    max_epochs); None for cosine."""
    if c["lr_schedule"] != "wsd":
        return None
    iters = c["max_iters"]
    if c["max_epochs"] is not None:
        iters = min(iters, math.ceil(c["max_epochs"] * n_windows / (c["batch_size"] * c["gradient_accumulation_steps"])))
    end = c["lr_decay_iters"] or iters
    return end - round(c["decay_frac"] * end)


def before_decay(path, state, config, n_windows, defaults, verbose=True):
    """(path, state) to continue a run from: the step_ checkpoint where its decay began when config
    moves the decay later than where the run is (a longer run), else the given ones. Without that
    file it warns and continues from the given state."""
    began, start = decay_start(state["config"], n_windows), decay_start(config, n_windows)
    if began is None or start is None or began >= min(start, state["iter_num"]):
        return path, state
    try:
        step_path, step, _ = find(f"step_{began}", os.path.dirname(path), defaults)
    except CheckpointError as e:
        if verbose:
            print(f"warning: the decay of {path} began at iter {began} and no checkpoint from there is usable "
                  f"({e}); continuing from iter {state['iter_num']}, the learning rate back up", file=sys.stderr)
        return path, state
    if verbose:
        print(f"extending a run whose decay began at iter {began}: continuing from {step_path}, saved there "
              f"(best keeps the decayed weights until this run beats them)")
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
    note). The file holds the owner's pid, host, start time and command; CheckpointError naming
    them when another process holds it. Removed at a normal exit."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"out_dir {out_dir!r} is a file, not a folder")
    path, created = os.path.join(out_dir, LOCK), not os.path.exists(out_dir)
    deadline = time.time() + 1.0  # `train.py --list` probes the lock for an instant
    try:
        os.makedirs(out_dir, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.time() > deadline:
                    raise CheckpointError(f"{out_dir} is in use by {owner(out_dir)}; wait for it to end or stop "
                                          f"it (its Ctrl-C or SIGTERM saves), or use another --out_dir") from None
                time.sleep(0.05)
                continue
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # its owner removed it on exit between our open and flock: take the new one
        note = os.read(fd, 4096)
        info = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                    command=shlex.join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as e:
        raise CheckpointError(f"cannot write to out_dir {out_dir!r} ({LOCK}): {oneline(e)}") from None
    _held.append((fd, path, created))
    atexit.register(unlock)
    old = _parse_note(note)
    if old and old.get("host") == info["host"] and _alive_trainer(old.get("pid")):
        print(f"warning: {path} names pid {old['pid']} on this host, still running, yet its lock did not hold: "
              f"file locks do not work on this file system (some NFS setups); make sure no other training "
              f"process writes into {out_dir}", file=sys.stderr)


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
        except OSError:  # not empty, or a read-only or vanished out_dir: the kernel still releases the lock
            pass
        os.close(fd)
    _held.clear()


def owner(out_dir):
    """Who holds out_dir's lock ('pid 4242 on host h since 2026-11-30 02:41:07: train.py ...'),
    or None when no process does."""
    path = os.path.join(out_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
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
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}: {info.get('command')}"


def _parse_note(data):
    try:
        info = json.loads(data.decode())
        return info if isinstance(info, dict) else None
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

def files_kept(iters, *, ckpt_interval, rolling_interval, keep_last, save_best, epoch_iters, keep_epochs):
    """How many checkpoint files the tiers can hold at once over the next `iters` iterations
    (epoch_iters: iterations per epoch, None without epoch_ files); an upper bound, since one save
    published under several names is a single file."""
    files = 2 * bool(ckpt_interval) + bool(save_best)  # latest + latest_backup, best
    if rolling_interval:
        files += min(iters // rolling_interval, keep_last if keep_last > 0 else iters)
    if epoch_iters:  # at most one per rolling_interval (train.py)
        every = epoch_iters * max(1, math.ceil(rolling_interval / epoch_iters))
        files += min(int(iters // every), keep_epochs if keep_epochs > 0 else iters)
    return files


def prepare_out_dir(out_dir, *, new_run, file_bytes, files):
    """Before a run's first write into out_dir: it must take files; for a new run, what an older
    run left there moves aside (move_aside); and the tiers' files (files_kept) of file_bytes each
    should fit on its disk: a warning if they may not, CheckpointError if not even one save fits,
    as for an out_dir that cannot be written. Warn now, not hours into a run."""
    problem = check_writable(out_dir)
    if problem:
        raise CheckpointError(problem)
    moved = move_aside(out_dir) if new_run else None
    if moved:
        print(f"moved what was in {out_dir} to {moved}")
    problem = check_disk(out_dir, file_bytes=file_bytes, files=files)
    if problem and problem.startswith("cannot"):
        raise CheckpointError(problem)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)


def check_writable(out_dir):
    """None if out_dir is (or could be made) a folder that takes a new file; else one line why."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"out_dir {out_dir!r} is a file, not a folder"
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return f"cannot write to out_dir {out_dir!r}: {oneline(e)}"
    problem = _write_test(out_dir)
    return f"cannot write to out_dir {out_dir!r}: {problem}" if problem else None


def check_disk(out_dir, *, file_bytes, files):
    """None if `files` checkpoints of file_bytes fit on out_dir's filesystem beside what is there;
    else one line: 'cannot ...' when not even one save fits (it needs a scratch copy too)."""
    probe = out_dir
    while not os.path.isdir(probe):  # out_dir may not exist yet: its nearest existing parent
        probe = os.path.dirname(os.path.abspath(probe))
    free = shutil.disk_usage(probe).free
    have = checkpoint.disk_bytes(checkpoint.tier_files(out_dir).values())  # replaced, not added to
    if free < 2 * file_bytes:
        return (f"cannot save a checkpoint: one takes {file_bytes / 1e9:.1f} GB (twice that while it is written) "
                f"and {probe} has {free / 1e9:.1f} GB free; free space or use another --out_dir")
    need = files * file_bytes + file_bytes - have
    if need > free:
        return (f"the checkpoint tiers may need {need / 1e9:.1f} GB ({files} files of {file_bytes / 1e9:.1f} GB) "
                f"and {probe} has {free / 1e9:.1f} GB free; lower keep_last / keep_epochs or raise "
                f"rolling_interval, or free space")
    return None


def move_aside(out_dir) -> str:
    """Move what a run wrote in out_dir (its tiers and RUN_FILES; nothing else, whatever else is there)
    into out_dir/previous-<time>/, never deleted; returns that folder, or None if there was nothing."""
    names = [os.path.basename(p) for p in checkpoint.tier_files(out_dir).values()]
    names += [n for n in sorted(os.listdir(out_dir)) if RUN_FILES.fullmatch(n)] if os.path.isdir(out_dir) else []
    if not names:
        return None
    dest = os.path.join(out_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    while os.path.exists(dest):
        dest += "+"
    try:
        os.mkdir(dest)
        for n in names:
            os.rename(os.path.join(out_dir, n), os.path.join(dest, n))
        checkpoint.fsync(out_dir)
    except OSError as e:  # renames only: every file is whole, in out_dir or in dest
        raise CheckpointError(f"cannot move the old run in {out_dir} aside to {dest}: {oneline(e)}") from None
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
            checkpoint.read_header(path)  # one of our files (CheckpointError for gpt2, hf:, nanogpt: names)
            os.link(path, dest)
        except (OSError, CheckpointError):  # another filesystem, or gpt2 / hf: / nanogpt: weights
            checkpoint.save(dest, {k: state[k] for k in ("model", "model_args", "tokenizer") if k in state})
    except OSError as e:
        raise CheckpointError(f"cannot keep the base of this run as {dest}: {oneline(e)}") from None
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
        torch.cuda.set_rng_state(tree["cuda"][0])  # the current device's (older files: GPU 0's, rank 0's)

# -----------------------------------------------------------------------------
# an output file, before the work that fills it

def check_output(path, what, folder=False):
    """None if path can be written now, else one line why, naming `what` (e.g. '--json=x.json'):
    a name that is not blank; nothing there, a file to replace or a device (/dev/null), but no FIFO,
    whose open would wait for a reader forever (folder=True: a folder to create, or an empty one to
    replace, as export.py --format=hf does); in an existing folder that takes a new file. Every
    script that writes checks each output before its work, so no result is lost to a typo at the
    end; prepare.py and train.py check their out_dir (check_writable)."""
    path = os.fspath(path)
    if not path.strip():
        return f"{what}: the name is blank"
    if os.path.isdir(path):
        if not folder:
            return f"{what} is a folder, not a file: name a file in it"
        if os.listdir(path):
            return f"{what} is a folder that is not empty"
    elif os.path.exists(path):
        mode = os.stat(path).st_mode
        if folder or not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            return f"{what} exists and is not a {'folder' if folder else 'regular file'}"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"{what}: the folder {parent} does not exist" + (" (it is a file)" if os.path.exists(parent) else "")
    problem = _write_test(parent)
    return f"{what}: cannot write in {parent}: {problem}" if problem else None


def _write_test(folder):
    """None if a new file can be written in folder, else the OS's reason: permissions, a read-only
    mount, /proc are found out by trying."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return oneline(e)
    return None
