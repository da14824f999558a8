"""
Checkpoints: one verified .safetensors file each, written atomically, kept in tiers in out_dir:
latest (+ latest_backup), rolling step_NNNNNNN, epoch_NNNN (kept forever), best.

    save(path, state) / load(path)       one file; load() checks a sha256 over all of it
    save_tiers(out_dir, state, ...)      serialize once, publish under each tier name
    Writer(background).save(...)         save_tiers from a snapshot, in a background thread
    start_point(init_from, out_dir, ...) what a training command starts from (resume, new run, refusal)
    find(init_from, out_dir) / find_or_exit(...) / resolve(...) / list_checkpoints(out_dir)
    prepare_out_dir / move_aside / trim_log / keep_base   out_dir before and after a (re)start
    rng_state() / set_rng_state(tree)    every RNG training draws from

Only safetensors reads and writes these files (no pickle, no torch.load), so opening a checkpoint
someone sent you cannot run their code. Tensors are stored under their path in the state tree
("model/lm_head.weight", "optimizer/state/3/exp_avg"), everything else as JSON in the header.
Files are published by tmp + fsync + rename + fsync(dir): a kill or power cut at any moment
leaves either the old complete file or the new complete one.
"""
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import threading
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "sturdygpt-checkpoint-2"  # -1: the same, with its metadata under four keys (read, never written)
READS = (FORMAT, "sturdygpt-checkpoint-1")
INFO_KEYS = ("iter_num", "epoch", "val_loss", "best_val_loss", "time")  # what read_info() returns
NAME = re.compile(r"(latest|latest_backup|best)|step_(\d+)|epoch_(\d+)")
IMPORT = re.compile(r"gpt2(-medium|-large|-xl)?|(hf|nanogpt):.*", re.DOTALL)  # other formats' weights: interop.py
TMP = re.compile(r"\.ckpt-tmp-(\d+)")  # a saving process's scratch dir
TENSOR, TUPLE, DICT = "__tensor__", "__tuple__", "__dict__"  # tags in the JSON tree

class CheckpointError(Exception):
    """str() is a one-line reason, fit to print as is."""

def _oneline(e):
    return " ".join((e.strerror if isinstance(e, OSError) and e.strerror else str(e)).split()) or type(e).__name__

# -----------------------------------------------------------------------------
# one file

def _flatten(state):
    """Split a state tree into (JSON-able tree, {key: cpu tensor}); tied tensors are stored once."""
    tensors, views, storages = {}, {}, set()
    def walk(x, path):
        sub = lambda k: f"{path}/{k}" if path else str(k)
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.is_quantized:
                raise CheckpointError(f"cannot save {path}: only dense tensors are supported")
            x = x.detach()
            storage = (x.device, x.untyped_storage().data_ptr())
            view = storage + (x.storage_offset(), x.shape, x.stride(), x.dtype)
            if x.numel() and view in views:  # tied weights (wte / lm_head): one copy, one object on load
                return {TENSOR: views[view]}
            if x.numel() and storage in storages:  # other overlaps: safetensors refuses shared storage
                x = x.clone()
            key = path
            while key in tensors:  # int key 3 and str key "3" in one dict
                key += "+"
            views[view], tensors[key] = key, x
            storages.add(storage)
            return {TENSOR: key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not x.keys() & {TENSOR, TUPLE, DICT}:
                return {k: walk(v, sub(k)) for k, v in x.items()}
            # keep int keys: Optimizer.load_state_dict silently drops state whose keys are str
            return {DICT: [[walk(k, path), walk(v, sub(k))] for k, v in x.items()]}
        if isinstance(x, (tuple, list)):
            items = [walk(v, sub(i)) for i, v in enumerate(x)]
            return {TUPLE: items} if isinstance(x, tuple) else items
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, np.generic):
            return x.item()
        raise CheckpointError(f"cannot save {path or 'state'}: unsupported type {type(x).__name__} "
                              "(use tensors, dicts, lists, tuples, str/int/float/bool/None)")
    tree = walk(state, "")
    return tree, {k: t.cpu().contiguous() for k, t in tensors.items()}

def _unflatten(x, tensors):
    if isinstance(x, list):
        return [_unflatten(v, tensors) for v in x]
    if isinstance(x, dict) and len(x) == 1 and next(iter(x)) in (TENSOR, TUPLE, DICT):
        tag, v = next(iter(x.items()))
        if tag == TENSOR:
            return tensors[v]
        if tag == TUPLE:
            return tuple(_unflatten(i, tensors) for i in v)
        return {_unflatten(k, tensors): _unflatten(i, tensors) for k, i in v}
    if isinstance(x, dict):
        return {k: _unflatten(v, tensors) for k, v in x.items()}
    return x

def _checksum(meta, tensors):
    h = hashlib.sha256()
    for k in ("format", "info", "state"):
        h.update(meta[k].encode() + b"\0")
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()

def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def _write(path, state):
    """Serialize state into path (a scratch name that callers rename) and fsync it."""
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot save: state must be a dict, not {type(state).__name__}")
    tree, tensors = _flatten(state)
    info = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in state.items()
            if k in INFO_KEYS}  # nanoGPT's best_val_loss is a 0-dim tensor
    meta = dict(format=FORMAT, info=json.dumps({k: v for k, v in info.items() if isinstance(v, (int, float))}),
                state=json.dumps(tree))
    meta["checksum"] = _checksum(meta, tensors)
    # one metadata key: safetensors writes several in a random order, and a checkpoint's bytes
    # should depend on its state alone (a background save writes the same file as a direct one)
    save_file(tensors, path, metadata={"sturdygpt": json.dumps(meta)})
    umask = os.umask(0o22); os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors' own temp file is 0600
    _fsync(path)
    _read_header(path)  # the size matches the header, in case a write error went unreported

def _scratch(d):
    """A fresh scratch dir in d (same filesystem, so rename is atomic). Saving there also catches
    safetensors' own .tmpXXXXXX file; scratch dirs of dead processes (kill -9 mid-save) go."""
    for name in os.listdir(d):
        m = TMP.fullmatch(name)
        try:
            if m and int(m[1]) != os.getpid():
                os.kill(int(m[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(d, name), ignore_errors=True)
        except OSError:
            pass
    tmp = os.path.join(d, f".ckpt-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    return tmp

def _publish(d, state, names, what, rotate=False):
    """Serialize once into a scratch file, then rename a hard link of it to each of names in d.
    Every save is a new inode, so replacing latest never touches a step_ file linked to an older one."""
    tmp = None
    try:
        tmp = _scratch(d)
        src = os.path.join(tmp, "state.safetensors")
        _write(src, state)
        for name in names:  # all links first: if one fails, nothing in d has been touched yet
            try:
                os.link(src, os.path.join(tmp, name))
            except OSError:  # a filesystem without hard links: copy
                shutil.copyfile(src, os.path.join(tmp, name))
                _fsync(os.path.join(tmp, name))
        for name in names:
            dst = os.path.join(d, name)
            if rotate and name == "latest.safetensors" and os.path.exists(dst):
                # a crash right after this leaves latest_backup complete and latest missing
                os.replace(dst, os.path.join(d, "latest_backup.safetensors"))
            os.replace(os.path.join(tmp, name), dst)
        _fsync(d)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot save {what}: {_oneline(e)}") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

def save(path, state: dict) -> None:
    path = os.path.abspath(path)
    _publish(os.path.dirname(path), state, [os.path.basename(path)], path)

def _read_header(path):
    """Check the framing ourselves, for clear reasons; returns the sturdygpt metadata dict."""
    try:
        with open(path, "rb") as f:
            size, head = os.fstat(f.fileno()).st_size, f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if n == 0 or n > 100_000_000 or 8 + n > size:
                # never unpickled: loading a pickle (or torch.save's zip of one) can run arbitrary code
                if head[:1] == b"\x80":
                    raise CheckpointError("is a pickle file, not a .safetensors checkpoint (refused)")
                if head[:4] == b"PK\x03\x04":
                    raise CheckpointError("is a zip file (torch.save?), not a .safetensors checkpoint (refused)")
                raise CheckpointError("not a safetensors file (bad header length)" if n > 100_000_000
                                      else f"truncated ({size} bytes)")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(_oneline(e)) from None
    except (ValueError, RecursionError):  # bad JSON or UTF-8, or JSON nested beyond Python's stack
        raise CheckpointError("not a safetensors file (unreadable header)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict) and "sturdygpt" in meta:
        try:
            meta = json.loads(meta["sturdygpt"])
        except (TypeError, ValueError, RecursionError):
            raise CheckpointError("corrupt checkpoint (unreadable sturdygpt metadata)") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise CheckpointError("not a sturdygpt checkpoint (safetensors file without sturdygpt metadata)")
    if meta["format"] not in READS:
        raise CheckpointError(f"unsupported checkpoint format {meta['format']!r} (this code reads {FORMAT!r})")
    try:
        end = 8 + n + max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] + [0])
    except (TypeError, KeyError, IndexError):
        raise CheckpointError("not a safetensors file (bad tensor table)") from None
    if end != size:
        raise CheckpointError(f"truncated ({size} of {end} bytes)" if end > size
                              else f"corrupt ({size - end} trailing bytes)")
    return meta

def _read(path, bases=None):
    """Verify path and return its state tree; CheckpointError(reason) if it is bad. A LoRA run's
    file (one with a 'base') comes back whole: its base's weights with its own on top (bases: a
    dict that keeps read bases, for callers reading many adapters of one base)."""
    meta = _read_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if _checksum(meta, tensors) != meta["checksum"]:
            raise CheckpointError("checksum mismatch (file is corrupted)")
        state = _unflatten(json.loads(meta["state"]), tensors)
        if isinstance(state, dict) and isinstance(state.get("base"), dict):
            state = _with_base(state, path, {} if bases is None else bases)
        return state
    except CheckpointError:
        raise
    except Exception as e:  # a crafted header that still checksums; never a traceback
        raise CheckpointError(f"corrupt checkpoint ({type(e).__name__}: {_oneline(e)})") from None

def _with_base(state, path, bases):
    """An adapter state (a LoRA run saves only what trains) completed with its base's weights. The
    base is named by path, relative to the adapter's folder, and checksum (a sha256 of its content)."""
    from model import resize_vocab  # here: checkpoint.py itself never needs the model
    ref = state["base"]
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), ref["path"])
    try:
        checksum = _read_header(base_path)["checksum"]
    except CheckpointError as e:
        raise CheckpointError(f"its base {base_path} is missing or unreadable ({e}); this adapter needs that file")
    if checksum != ref["sha256"]:
        raise CheckpointError(f"its base {base_path} is not the file it was trained on (sha256 {checksum[:12]}, "
                              f"expected {ref['sha256'][:12]})")
    if (base_path, checksum) not in bases:
        base = _read(base_path)
        bases[(base_path, checksum)] = (base["model"], base["model_args"])
    weights, args = bases[(base_path, checksum)]
    if args["vocab_size"] != state["model_args"]["vocab_size"]:  # the run extended the vocabulary
        weights = resize_vocab(weights, args["vocab_size"], state["model_args"]["vocab_size"])
    weights, own = dict(weights), state["model"]
    for name, t in own.items():
        if name == "transformer.wte.weight" and t.size(0) < weights[name].size(0):  # new_tokens: the new rows
            t = torch.cat([weights[name][:-t.size(0)], t])
        weights[name] = t
    weights["lm_head.weight"] = weights["transformer.wte.weight"]  # tied
    return {**state, "model": weights}

def keep_base(out_dir, path, state) -> dict:
    """A run with frozen weights saves only what trains, so its base must stay exactly as it was:
    out_dir/base.safetensors, a hard link of the file it started from (no copy, and replacing that
    file later, like a newer best, cannot change it), else written from state. Returns the
    reference a checkpoint of the run stores: {'path', 'sha256'}."""
    dest = os.path.join(out_dir, "base.safetensors")
    if os.path.exists(dest):
        os.remove(dest)
    try:
        _read_header(path)  # one of our files (CheckpointError for gpt2, hf:, nanogpt: names)
        os.link(path, dest)
    except (OSError, CheckpointError):  # another filesystem, or gpt2 / hf: / nanogpt: weights
        save(dest, {k: state[k] for k in ("model", "model_args", "tokenizer") if k in state})
    return {"path": "base.safetensors", "sha256": _read_header(dest)["checksum"]}

def load(path) -> dict:
    try:
        return _read(os.fspath(path))
    except CheckpointError as e:
        raise CheckpointError(f"cannot load {path}: {e}") from None

def read_info(path) -> dict:
    """iter_num, epoch, val_loss, best_val_loss, time as saved: header only, not verified."""
    try:
        info = json.loads(_read_header(path).get("info", "{}"))
    except (CheckpointError, ValueError, RecursionError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return info if isinstance(info, dict) else {}

# the model shapes a checkpoint may claim (a crafted one could ask for a billion layers)
ARG_RANGES = dict(n_layer=1024, n_head=1024, n_embd=1 << 16, block_size=1 << 20, vocab_size=1 << 24)

def _usable(state, defaults=None):
    """CheckpointError unless state holds what the scripts read: model_args that build a GPT,
    weights of exactly that GPT's shapes, a tokenizer, and for a training checkpoint (one with an
    optimizer) the run's position and a config whose values have the types of `defaults`."""
    def bad(why):
        return CheckpointError(f"unusable checkpoint ({why})")
    if not isinstance(state, dict):
        raise bad(f"its state is a {type(state).__name__}, not a dict")
    for key in ("model_args", "model", "tokenizer"):
        if not isinstance(state.get(key), dict):
            raise bad(f"no {key}")
    args = state["model_args"]
    for key, top in ARG_RANGES.items():
        if not (isinstance(args.get(key), int) and 1 <= args[key] <= top):
            raise bad(f"model_args {key}={args.get(key)!r}")
    from model import GPTConfig, state_shapes  # here: checkpoint.py itself never needs the model
    try:
        expected = state_shapes(GPTConfig(**args))
    except Exception as e:
        raise bad(f"its model_args build no model: {type(e).__name__}: {_oneline(e)}")
    weights = state["model"]
    for key in expected.keys() | weights.keys():
        if not isinstance(weights.get(key), torch.Tensor) or tuple(weights[key].shape) != expected.get(key):
            raise bad(f"weight {key}: {tuple(getattr(weights.get(key), 'shape', ()))} where its model_args "
                      f"make {tuple(expected[key]) if key in expected else 'none'}")
    tok = state["tokenizer"]
    if tok.get("kind") not in ("bpe", "gpt2", "byte") or not isinstance(tok.get("vocab_size"), int) \
            or not isinstance(tok.get("eot_id"), int) or not isinstance(tok.get("fingerprint"), str):
        raise bad("its tokenizer record is incomplete")
    if "optimizer" not in state:
        return
    pos, opt, config = state.get("data_pos"), state["optimizer"], state.get("config")
    if not (isinstance(state.get("iter_num"), int) and state["iter_num"] >= 0 and isinstance(pos, list)
            and len(pos) == 2 and all(isinstance(p, int) and p >= 0 for p in pos)):
        raise bad("its iteration or data position is not a count")
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise bad("its optimizer state is malformed")
    if not isinstance(config, dict) or not isinstance(state.get("rng"), dict) or not isinstance(state.get("data"), dict):
        raise bad("no config, RNG state or data record")
    from configurator import fits
    for key, value in config.items():
        if defaults and key in defaults and not fits(value, defaults[key]):
            raise bad(f"its config has {key}={value!r}, not a {type(defaults[key]).__name__}")

# -----------------------------------------------------------------------------
# tiers in out_dir

def _tier_files(out_dir):
    """{name: path} of the checkpoint files in out_dir, never scratch files."""
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    return {n[:-12]: os.path.join(out_dir, n) for n in names
            if n.endswith(".safetensors") and NAME.fullmatch(n[:-12])}

def has_run(out_dir) -> bool:
    """Whether out_dir holds checkpoints (valid or not) of a run."""
    return bool(_tier_files(out_dir))

RUN_FILES = re.compile(r"(latest|latest_backup|best|base|step_\d+|epoch_\d+)\.safetensors|log\.jsonl(\.dropped)?"
                       r"|summary\.json|tb|\.ckpt-tmp-\d+")  # what a training run writes in out_dir

def move_aside(out_dir) -> str:
    """Move what a run wrote in out_dir (RUN_FILES; nothing else, whatever else is there) into
    out_dir/previous-<time>/, never deleted; returns that folder, or None if there was nothing."""
    names = [n for n in sorted(os.listdir(out_dir)) if RUN_FILES.fullmatch(n)] if os.path.isdir(out_dir) else []
    if not names:
        return None
    dest = os.path.join(out_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    while os.path.exists(dest):
        dest += "+"
    os.mkdir(dest)
    for n in names:
        os.rename(os.path.join(out_dir, n), os.path.join(dest, n))
    _fsync(out_dir)
    return dest

def trim_log(path, last_iter):
    """Drop the records after last_iter (work a kill -9 lost, about to be redone) from the live log,
    so it holds each iteration once; they are appended to log.jsonl.dropped, then the log is
    replaced atomically."""
    if not os.path.exists(path):
        return
    keep, drop = [], []
    with open(path) as f:
        for line in f:
            try:
                (keep if json.loads(line).get("step", 0) <= last_iter else drop).append(line)
            except ValueError:  # a line cut short by the kill
                drop.append(line)
    if not drop:
        return
    with open(path + ".dropped", "a") as f:
        f.writelines(drop)
        os.fsync(f.fileno())
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    print(f"log.jsonl: {len(drop)} records after iter {last_iter} moved to log.jsonl.dropped")


def _disk_bytes(paths):
    sizes = {}
    for p in paths:
        try:
            st = os.stat(p)
            sizes[(st.st_dev, st.st_ino)] = st.st_size  # hard links counted once
        except OSError:  # removed meanwhile
            pass
    return sum(sizes.values())

def save_tiers(out_dir, state, *, iter_num, latest, rolling, epoch, best, keep_last, keep_epochs=0, protect=()):
    """Save once under each requested tier name, then prune the step_ and epoch_ files to the newest
    keep_last / keep_epochs (<= 0 keeps all)."""
    names = [n + ".safetensors" for n, want in (("latest", latest), (f"step_{iter_num:07d}", rolling),
             (f"epoch_{epoch or 0:04d}", epoch is not None), ("best", best)) if want]
    if names:
        _publish(out_dir, state, names, f"checkpoint in {out_dir}", rotate=True)
    # prune, never the file training resumed from
    keep = {os.path.realpath(p) for p in protect}
    files = _tier_files(out_dir)
    for prefix, n in (("step_", keep_last), ("epoch_", keep_epochs)):
        numbered = sorted((int(name[len(prefix):]), p) for name, p in files.items() if name.startswith(prefix))
        for _, p in numbered[:-n] if n and n > 0 else ():
            try:
                if os.path.realpath(p) not in keep:
                    os.remove(p)
            except OSError:  # best effort: the save itself succeeded
                pass
    return names, _disk_bytes(_tier_files(out_dir).values())

class Writer:
    """Saves tiers (save_tiers' arguments) and prints one line per save. In a background thread,
    training blocks only for a snapshot of the state: a copy into buffers kept between saves (on a
    GPU, pinned host memory the copy is queued into; fresh memory each time would cost more in page
    faults than the copy).
    At most one save is in flight: the next one first waits for it. A failed write surfaces as
    CheckpointError at the next save() or wait(); the files it would have replaced are intact.
    With background=False save() writes in the calling thread, as save_tiers does."""

    def __init__(self, background=True):
        self.background, self.buffers, self.thread, self.error, self.done = background, {}, None, None, None

    def save(self, out_dir, state, **tiers) -> float:
        """Start saving state; returns the seconds the caller was blocked."""
        t0 = time.time()
        self.wait()
        if not self.background:
            self._write(out_dir, state, None, tiers)
            self.wait()
            return time.time() - t0
        state, ready = self._snapshot(state)
        self.thread = threading.Thread(target=self._write, args=(out_dir, state, ready, tiers), daemon=True)
        self.thread.start()
        return time.time() - t0

    def wait(self):
        """Wait for the save in flight; returns (names, disk bytes, seconds) of the last finished one."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.done

    def _write(self, out_dir, state, ready, tiers):
        t0 = time.time()
        try:
            if ready is not None:
                ready.synchronize()  # the queued device -> host copies have landed
            names, disk = save_tiers(out_dir, state, **tiers)
            self.done = (names, disk, time.time() - t0)
            where = " in the background" if self.background else ""
            print(f"saved {', '.join(names)}{where} in {self.done[2]:.2f}s; checkpoints use {disk / 2**20:.1f} MB",
                  flush=True)
        except Exception as e:  # reported by the next save() or wait(), in the training thread
            self.error = e if isinstance(e, CheckpointError) else CheckpointError(f"cannot save: {_oneline(e)}")

    def _snapshot(self, tree):
        """A copy of tree whose tensors live in this writer's buffers (one per path, reused); tensors
        that alias each other (tied weights) map to one buffer, so the file is the same as from tree."""
        seen, cuda = {}, False
        def walk(x, path):
            nonlocal cuda
            if isinstance(x, torch.Tensor):
                key = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride(), x.dtype)
                if key not in seen:
                    buf = self.buffers.get(path)
                    if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
                        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
                        self.buffers[path] = buf
                    buf.copy_(x.detach(), non_blocking=x.is_cuda)
                    cuda |= x.is_cuda
                    seen[key] = buf
                return seen[key]
            if isinstance(x, dict):
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                items = [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
                return tuple(items) if isinstance(x, tuple) else items
            return copy.deepcopy(x)
        out = walk(tree, "")
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        return out, ready

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
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return f"cannot write to out_dir {out_dir!r}: {_oneline(e)}"
    return None

def check_disk(out_dir, *, file_bytes, files):
    """None if `files` checkpoints of file_bytes fit on out_dir's filesystem beside what is there;
    else one line: 'cannot ...' when not even one save fits (it needs a scratch copy too)."""
    probe = out_dir
    while not os.path.isdir(probe):  # out_dir may not exist yet: its nearest existing parent
        probe = os.path.dirname(os.path.abspath(probe))
    free = shutil.disk_usage(probe).free
    have = _disk_bytes(_tier_files(out_dir).values())  # today's files are replaced, not added to
    gb = lambda b: f"{b / 1e9:.1f} GB"
    if free < 2 * file_bytes:
        return (f"cannot save a checkpoint: one takes {gb(file_bytes)} (twice that while it is written) and "
                f"{probe} has {gb(free)} free; free space or use another --out_dir")
    need = files * file_bytes + file_bytes - have
    if need > free:
        return (f"the checkpoint tiers may need {gb(need)} ({files} files of {gb(file_bytes)}) and {probe} has "
                f"{gb(free)} free; lower keep_last / keep_epochs or raise rolling_interval, or free space")
    return None

def find_resume(out_dir, defaults=None):
    """latest -> latest_backup -> step_/epoch_ newest first -> best (last: it may be older, but a run
    killed before its first latest has only best)."""
    files = _tier_files(out_dir)
    def newest(name):
        try:
            it = read_info(files[name]).get("iter_num")
        except CheckpointError:
            it = None
        m = NAME.fullmatch(name)
        return (it if isinstance(it, int) else int(m[2]) if m[2] else -1, os.path.getmtime(files[name]))
    order = [n for n in ("latest", "latest_backup") if n in files]
    order += sorted([n for n in files if n.startswith(("step_", "epoch_"))], key=newest, reverse=True)
    order += ["best"] if "best" in files else []
    skipped, failed = [], {}
    for name in order:
        path, fname = files[name], name + ".safetensors"
        try:
            st = os.stat(path)
        except OSError:  # removed meanwhile
            continue
        ino = (st.st_dev, st.st_ino)
        if ino in failed:  # a hard link of a file that already failed
            skipped.append(f"{fname}: same file as {failed[ino]}, skipped")
            continue
        try:
            state = _read(path)
            _usable(state, defaults)
            return path, state, skipped
        except CheckpointError as e:
            failed[ino] = fname
            skipped.append(f"{fname}: {e}, falling back")
    if not skipped:
        raise CheckpointError(f"no checkpoint in {out_dir} (looked for latest, latest_backup, step_*, epoch_*, best)")
    raise CheckpointError(f"no valid checkpoint in {out_dir}: " + "; ".join(skipped))

def find(init_from, out_dir, defaults=None):
    """(path, state, skipped) for init_from 'resume' (the newest usable, as find_resume) or a name
    or path (as resolve); what train.py, sample.py and evaluate.py start from. Other formats ('gpt2'
    .. 'gpt2-xl', 'hf:DIR', 'nanogpt:PATH') come from interop.py as states without training state.
    `defaults`: the training config's, whose types a training checkpoint's config must have."""
    if init_from == "resume":
        return find_resume(out_dir, defaults)
    if IMPORT.fullmatch(os.fspath(init_from)):
        import interop  # here: interop imports this module
        return *interop.load(init_from), []
    path = resolve(init_from, out_dir)
    state = load(path)
    try:
        _usable(state, defaults)
    except CheckpointError as e:
        raise CheckpointError(f"cannot use {path}: {e}") from None
    return path, state, []

def start_point(init_from, out_dir, *, reset_state, overwrite, defaults=None):
    """What a training command starts from: (init_from as decided, path, state, continuing, origin),
    path and state None from scratch. The same command line starts a run and, after a crash, a
    Ctrl-C or a requeue, continues it: 'auto' resumes the run in out_dir (its checkpoints) when
    there is one. A new run (scratch, or another checkpoint's weights) into an out_dir that holds a
    run is refused, unless overwrite (the caller moves the old run aside) or unless this very
    command started that run (its checkpoints' origin), which is then continued: a requeued
    fine-tune. origin is how a run began, kept in its checkpoints. Warnings go to stderr."""
    if init_from == "auto":
        init_from = "resume" if has_run(out_dir) and not overwrite else "scratch"
    continuing = init_from == "resume" or (init_from != "scratch" and not reset_state and in_dir(init_from, out_dir))
    origin = None if init_from == "scratch" else f"{init_from} reset_state={reset_state}"
    if continuing and overwrite:
        raise CheckpointError(f"--overwrite=True starts a new run and --init_from={init_from} continues the one "
                              f"in {out_dir}: choose one")
    if not continuing and has_run(out_dir) and not overwrite:
        path, state, skipped = find("resume", out_dir, defaults)
        if init_from == "scratch" or state.get("origin") != origin:
            raise CheckpointError(f"{out_dir} holds a run ({os.path.basename(path)} at iter {state['iter_num']}); "
                                  f"continue it by leaving out --init_from, start over with --overwrite=True "
                                  f"(moves it to {out_dir}/previous-*/), or use another --out_dir")
        print(f"{out_dir} holds the run this command started from {init_from}: continuing it")
        continuing = True
    elif init_from == "scratch":
        return init_from, None, None, False, origin
    else:
        path, state, skipped = find(init_from, out_dir, defaults)
    for reason in skipped:
        print(f"warning: {reason}", file=sys.stderr)
    return init_from, path, state, continuing, state.get("origin") if continuing else origin

def find_or_exit(init_from, out_dir, prog, hint='', defaults=None):
    """find() for scripts: (path, state); the tiers it skipped are warnings on stderr, and failure
    is one line and exit status 1."""
    try:
        path, state, skipped = find(init_from, out_dir, defaults)
    except CheckpointError as e:
        raise SystemExit(f"{prog}: error: {e}{'' if IMPORT.fullmatch(os.fspath(init_from)) else hint}") from None
    for reason in skipped:
        print(f"warning: {reason}", file=sys.stderr)
    return path, state

def in_dir(init_from, out_dir) -> bool:
    """Whether init_from names a checkpoint of out_dir's own run: a tier name, or a path in out_dir."""
    init_from = os.fspath(init_from)
    if IMPORT.fullmatch(init_from):
        return False
    if NAME.fullmatch(init_from.removesuffix(".safetensors")):
        return True
    path = os.path.realpath(init_from)
    return (path if os.path.isdir(path) else os.path.dirname(path)) == os.path.realpath(out_dir)

def resolve(init_from, out_dir) -> str:
    init_from = os.fspath(init_from)
    m = NAME.fullmatch(init_from.removesuffix(".safetensors"))
    if m:  # step_100 and step_0000100 name the same file
        name = m[1] or (f"step_{int(m[2]):07d}" if m[2] else f"epoch_{int(m[3]):04d}")
        if os.path.isfile(os.path.join(out_dir, name + ".safetensors")):
            return os.path.join(out_dir, name + ".safetensors")
    if os.path.isfile(init_from):
        return init_from
    if os.path.isdir(init_from):
        return find_resume(init_from)[0]
    have = ", ".join(_tier_files(out_dir)) or "none"
    raise CheckpointError(f"checkpoint {init_from!r} not found in {out_dir} (have: {have}); use latest, "
                          "latest_backup, best, step_NNNNNNN, epoch_NNNN, a file or a directory")

def list_checkpoints(out_dir, verify=True, defaults=None) -> list:
    """One row per checkpoint file; ok: the checksum verifies and the state is usable (once per inode)."""
    rows, errors, now, bases = [], {}, time.time(), {}  # errors: inode -> reason, or None if it verified
    for name, path in _tier_files(out_dir).items():
        st = os.stat(path)
        ino = (st.st_dev, st.st_ino)
        row = dict(tier=NAME.fullmatch(name)[1] or name.split("_")[0], name=name, iter=None, epoch=None,
                   val_loss=None, bytes=st.st_size, age_s=now - st.st_mtime, path=path)
        try:
            info = json.loads(_read_header(path).get("info", "{}"))
            row.update(iter=info.get("iter_num"), epoch=info.get("epoch"),
                       val_loss=info.get("val_loss", info.get("best_val_loss")))
            if verify and ino not in errors:
                _usable(_read(path, bases), defaults)
                errors[ino] = None
        except (CheckpointError, ValueError, RecursionError, AttributeError) as e:
            errors[ino] = str(e)
        rows.append(dict(row, ok=errors[ino] is None if ino in errors else None, error=errors.get(ino)))
    order = ["latest", "latest_backup", "best", "epoch", "step"]
    return sorted(rows, key=lambda r: (order.index(r["tier"]), r["name"]))

def format_listing(rows) -> str:
    size = lambda b: next(f"{b / 1024**i:.1f} {u}" for i, u in ((3, "GB"), (2, "MB"), (1, "KB"), (0, "B"))
                          if b >= 1024**i or not i)
    age = lambda s: next(f"{s / d:.0f}{u}" for d, u in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s"))
                         if s >= d or d == 1)
    num = lambda v: "-" if v is None else str(v)
    table = [("name", "iter", "epoch", "val_loss", "size", "age", "status")]
    for r in rows:
        status = "ok" if r["ok"] else "not verified" if r["ok"] is None else f"BAD: {r['error']}"
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        table.append((r["name"], num(r["iter"]), num(r["epoch"]), val, size(r["bytes"]), age(r["age_s"]), status))
    w = [max(len(row[i]) for row in table) for i in range(7)]
    lines = ["  ".join(c.ljust(w[i]) if i in (0, 6) else c.rjust(w[i]) for i, c in enumerate(row)).rstrip()
             for row in table]
    disk = _disk_bytes(r["path"] for r in rows)
    return "\n".join(lines + [f"{len(rows)} checkpoint files, {size(disk)} on disk (hard links counted once)"])

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
