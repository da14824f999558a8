"""
Checkpoints on disk: one verified .safetensors file each, written atomically, kept in tiers in a
folder: latest (+ latest_backup), best, and numbered ones (step_NNNNNNN, epoch_NNNN). This module
knows bytes, names and checksums; what a state means (a GPT, a training run) is its callers'
business.

    save(path, state) / load(path)       one file; load() checks a sha256 over all of it
    save_tiers(out_dir, state, names)    serialize once, publish under each tier name, prune
    Writer(background).save(...)         save_tiers from a snapshot, in a background thread
    find_resume(out_dir, check)          the newest file that verifies (and passes check)
    resolve(name, out_dir) / list_checkpoints(out_dir, check) / format_listing(rows)

Only safetensors reads and writes these files (no pickle, no torch.load), so opening a checkpoint
someone sent you cannot run their code. Tensors are stored under their path in the state tree
("model/lm_head.weight", "optimizer/state/3/exp_avg"), everything else as JSON in the header.
Files are published by tmp + fsync + rename + fsync(dir): a kill or power cut at any moment
leaves either the old complete file or the new complete one.
"""
import collections
import copy
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import files
from errors import Error, oneline

FORMAT = "sturdygpt-checkpoint-2"
# -1: the same, with its metadata under four keys (read, never written)
READS = (FORMAT, "sturdygpt-checkpoint-1")
INFO_KEYS = ("iter_num", "epoch", "val_loss", "best_val_loss", "time")  # what read_info() returns
# numbered tiers: PREFIX_NNNN files, of which save_tiers keeps the newest few
TIERS = ("step", "epoch")
NAME = re.compile(rf"(latest|latest_backup|best)|({'|'.join(TIERS)})_(\d+)")
TMP = re.compile(r"\.ckpt-tmp-(\d+)")  # a saving process's scratch dir
TENSOR, TUPLE, DICT = "__tensor__", "__tuple__", "__dict__"  # tags in the JSON tree


# -----------------------------------------------------------------------------
# one file

def flatten(state):
    """Split a state tree into (JSON-able tree, {key: cpu tensor}); tied tensors are stored once."""
    # storages: the byte areas saved of each
    tensors, views, storages = {}, {}, collections.defaultdict(list)
    def walk(x, path):
        sub = lambda k: f"{path}/{k}" if path else str(k)
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.is_quantized:
                raise Error(f"cannot save {path}: only dense tensors are supported")
            x = x.detach()
            storage = (x.device, x.untyped_storage().data_ptr())
            view = storage + (x.storage_offset(), x.shape, x.stride(), x.dtype)
            # tied weights (wte / lm_head): one copy, one object on load
            if x.numel() and view in views:
                return {TENSOR: views[view]}
            start = x.storage_offset() * x.element_size()
            area = (start, start + x.numel() * x.element_size())
            if x.numel() and (not x.is_contiguous()
                              or any(a < area[1] and area[0] < b for a, b in storages[storage])):
                # other overlaps: safetensors refuses them (apart views of one buffer are fine)
                x = x.clone()
            else:
                storages[storage].append(area)
            key = path
            while key in tensors:  # int key 3 and str key "3" in one dict
                key += "+"
            views[view], tensors[key] = key, x
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
        raise Error(f"cannot save {path or 'state'}: unsupported type {type(x).__name__} "
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

def digest(meta, tensors) -> str:
    """The sha256 a file's metadata (its "checksum") holds: over the header's fields and every
    tensor's bytes."""
    h = hashlib.sha256()
    for k in ("format", "info", "state"):
        h.update(meta[k].encode() + b"\0")
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()

def _write(path, state):
    """Serialize state into path (a scratch name that callers rename) and fsync it."""
    if not isinstance(state, dict):
        raise Error(f"cannot save: state must be a dict, not {type(state).__name__}")
    tree, tensors = flatten(state)
    # nanoGPT's best_val_loss is a 0-dim tensor
    info = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
            for k, v in state.items() if k in INFO_KEYS}
    meta = dict(format=FORMAT,
                info=json.dumps({k: v for k, v in info.items() if isinstance(v, (int, float))}),
                state=json.dumps(tree))
    meta["checksum"] = digest(meta, tensors)
    # one metadata key: safetensors writes several in a random order, and a checkpoint's bytes
    # should depend on its state alone (a background save writes the same file as a direct one)
    save_file(tensors, path, metadata={"sturdygpt": json.dumps(meta)})
    files.new_file_mode(path)
    files.fsync(path)
    read_header(path)  # the size matches the header, in case a write error went unreported

def _scratch(d):
    """A fresh scratch dir in d (same filesystem, so rename is atomic). Saving there also catches
    safetensors' own .tmpXXXXXX file; scratch dirs of dead processes (kill -9 mid-save) go."""
    for name in os.listdir(d):
        m = TMP.fullmatch(name)
        if m and not files.alive(int(m[1])):
            shutil.rmtree(os.path.join(d, name), ignore_errors=True)
    tmp = os.path.join(d, f".ckpt-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    return tmp

def _publish(d, state, names, what, rotate=False):
    """Serialize once into a scratch file, then rename a hard link of it to each of names in d.
    Every save is a new inode, so replacing latest never touches a step_ file linked to an older
    one."""
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
                files.fsync(os.path.join(tmp, name))
        for name in names:
            dst = os.path.join(d, name)
            if rotate and name == "latest.safetensors" and os.path.exists(dst):
                # a crash right after this leaves latest_backup complete and latest missing
                os.replace(dst, os.path.join(d, "latest_backup.safetensors"))
            os.replace(os.path.join(tmp, name), dst)
        files.fsync(d)
    except Error:
        raise
    except Exception as e:
        raise Error(f"cannot save {what}: {oneline(e)}") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

def save(path, state: dict) -> None:
    """Write state to path atomically: the old file or the new one, whole, whatever happens."""
    path = os.path.abspath(path)
    _publish(os.path.dirname(path), state, [os.path.basename(path)], path)

def read_header(path):
    """Check the framing ourselves, for clear reasons; returns the sturdygpt metadata dict."""
    try:
        with open(path, "rb") as f:
            size, head = os.fstat(f.fileno()).st_size, f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if n == 0 or n > 100_000_000 or 8 + n > size:
                # never unpickled: a pickle (or torch.save's zip of one) can run arbitrary code
                if head[:1] == b"\x80":
                    raise Error("is a pickle file, not a .safetensors checkpoint (refused)")
                if head[:4] == b"PK\x03\x04":
                    raise Error("is a zip file (torch.save?), not a .safetensors checkpoint "
                                "(refused)")
                raise Error("not a safetensors file (bad header length)" if n > 100_000_000
                                      else f"truncated ({size} bytes)")
            header = json.loads(f.read(n))
    except Error:
        raise
    except OSError as e:
        raise Error(oneline(e)) from None
    except (ValueError, RecursionError):  # bad JSON or UTF-8, or JSON nested beyond Python's stack
        raise Error("not a safetensors file (unreadable header)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict) and "sturdygpt" in meta:
        try:
            meta = json.loads(meta["sturdygpt"])
        except (TypeError, ValueError, RecursionError):
            raise Error("corrupt checkpoint (unreadable sturdygpt metadata)") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise Error("not a sturdygpt checkpoint (safetensors file without sturdygpt metadata)")
    if meta["format"] not in READS:
        raise Error(f"unsupported checkpoint format {meta['format']!r} "
                    f"(this code reads {FORMAT!r})")
    try:
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        end = 8 + n + max(ends + [0])
    except (TypeError, KeyError, IndexError):
        raise Error("not a safetensors file (bad tensor table)") from None
    if end != size:
        raise Error(f"truncated ({size} of {end} bytes)" if end > size
                              else f"corrupt ({size - end} trailing bytes)")
    return meta

def _read(path):
    """The verified state tree of path; Error(reason) if it is bad."""
    meta = read_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if digest(meta, tensors) != meta["checksum"]:
            raise Error("checksum mismatch (file is corrupted)")
        return _unflatten(json.loads(meta["state"]), tensors)
    except Error:
        raise
    except Exception as e:  # a crafted header that still checksums; never a traceback
        raise Error(f"corrupt checkpoint ({type(e).__name__}: {oneline(e)})") from None


def load(path) -> dict:
    """The state tree saved in path, every byte checked against its checksum."""
    try:
        return _read(os.fspath(path))
    except Error as e:
        raise Error(f"cannot load {path}: {e}") from None


def read_info(path) -> dict:
    """iter_num, epoch, val_loss, best_val_loss, time as saved: header only, not verified."""
    try:
        info = json.loads(read_header(path).get("info", "{}"))
    except (Error, ValueError, RecursionError, AttributeError) as e:
        raise Error(f"cannot read {path}: {e}") from None
    return info if isinstance(info, dict) else {}

# -----------------------------------------------------------------------------
# tiers in a folder: 'latest' (its previous file kept as 'latest_backup'), 'best', and numbered
# tiers 'PREFIX_NNNN' (step_0000200, epoch_0003) of which the newest few are kept. Which tiers a
# save goes to, and when, is the caller's business

def tier_files(out_dir) -> dict:
    """{name: path} of the checkpoint files in out_dir ('latest', 'step_0000200', ...), never
    scratch files."""
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    return {n[:-12]: os.path.join(out_dir, n) for n in names
            if n.endswith(".safetensors") and NAME.fullmatch(n[:-12])}


def disk_bytes(paths) -> int:
    sizes = {}
    for p in paths:
        try:
            st = os.stat(p)
            sizes[(st.st_dev, st.st_ino)] = st.st_size  # hard links counted once
        except OSError:  # removed meanwhile
            pass
    return sum(sizes.values())


def save_tiers(out_dir, state, names, keep=None, protect=()):
    """Save state once and publish it under each tier name in names (['latest', 'step_0000200'];
    the previous latest becomes latest_backup), then prune each numbered tier to its newest
    keep[prefix] files (keep={'step': 10}; absent or <= 0 keeps all), never a file in protect.
    Returns (file names written, bytes the tiers use on disk)."""
    files = [n + ".safetensors" for n in names]
    if files:
        _publish(out_dir, state, files, f"checkpoint in {out_dir}", rotate=True)
    spared = {os.path.realpath(p) for p in protect}
    numbered = {}
    for name, path in tier_files(out_dir).items():
        m = NAME.fullmatch(name)
        if m[2]:
            numbered.setdefault(m[2], []).append((int(m[3]), path))
    for prefix, found in numbered.items():
        n = (keep or {}).get(prefix, 0)
        for _, path in sorted(found)[:-n] if n > 0 else ():
            try:
                if os.path.realpath(path) not in spared:
                    os.remove(path)
            except OSError:  # best effort: the save itself succeeded
                pass
    return files, disk_bytes(tier_files(out_dir).values())

# -----------------------------------------------------------------------------
# finding and listing. `check(state, path) -> state` is the caller's: it may complete a state and
# raises Error for one it cannot use, which is then skipped like a damaged file

def find_resume(out_dir, check=None):
    """(path, state, skipped) of the newest usable checkpoint: latest -> latest_backup -> numbered
    tiers newest first -> best (last: it may be older, but a run killed before its first latest has
    only best); skipped: a line per file passed over, and why."""
    files = tier_files(out_dir)
    def newest(name):
        try:
            it = read_info(files[name]).get("iter_num")
        except Error:
            it = None
        return (it if isinstance(it, int) else int(NAME.fullmatch(name)[3]),
                os.path.getmtime(files[name]))
    order = [n for n in ("latest", "latest_backup") if n in files]
    order += sorted([n for n in files if NAME.fullmatch(n)[2]], key=newest, reverse=True)
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
            return path, check(state, path) if check else state, skipped
        except Error as e:
            failed[ino] = fname
            skipped.append(f"{fname}: {e}, falling back")
    if not skipped:
        raise Error(f"no checkpoint in {out_dir} (looked for latest, latest_backup, step_*, "
                    "epoch_*, best)")
    raise Error(f"no valid checkpoint in {out_dir}: " + "; ".join(skipped))


def resolve(name, out_dir) -> str:
    """The file a name stands for: a tier name in out_dir, a file, or a folder's newest
    checkpoint."""
    name = os.fspath(name)
    m = NAME.fullmatch(name.removesuffix(".safetensors"))
    if m:  # step_100 and step_0000100 name the same file
        key = m[1] or (m[2], int(m[3]))
        for tier, path in tier_files(out_dir).items():
            t = NAME.fullmatch(tier)
            if (t[1] or (t[2], int(t[3]))) == key:
                return path
    if os.path.isfile(name):
        return name
    if os.path.isdir(name):
        return find_resume(name)[0]
    have = ", ".join(tier_files(out_dir)) or "none"
    raise Error(f"checkpoint {name!r} not found in {out_dir} (have: {have}); use latest, "
                          "latest_backup, best, step_NNNNNNN, epoch_NNNN, a file or a directory")


def list_checkpoints(out_dir, verify=True, check=None) -> list:
    """One row per checkpoint file; ok: it verifies and passes check (tested once per inode)."""
    rows, errors, now = [], {}, time.time()  # errors: inode -> reason, or None if it verified
    for name, path in tier_files(out_dir).items():
        st = os.stat(path)
        ino = (st.st_dev, st.st_ino)
        m = NAME.fullmatch(name)
        row = dict(tier=m[1] or m[2], name=name, iter=None, epoch=None,
                   val_loss=None, bytes=st.st_size, age_s=now - st.st_mtime, path=path)
        try:
            info = json.loads(read_header(path).get("info", "{}"))
            row.update(iter=info.get("iter_num"), epoch=info.get("epoch"),
                       val_loss=info.get("val_loss", info.get("best_val_loss")))
            if verify and ino not in errors:
                state = _read(path)
                if check:
                    check(state, path)
                errors[ino] = None
        except (Error, ValueError, RecursionError, AttributeError) as e:
            errors[ino] = str(e)
        rows.append(dict(row, ok=errors[ino] is None if ino in errors else None,
                         error=errors.get(ino)))
    first = ["latest", "latest_backup", "best"]  # then the numbered tiers, by name
    return sorted(rows, key=lambda r: (first.index(r["tier"]) if r["tier"] in first else 3,
                                       r["name"]))


def format_listing(rows) -> str:
    size = lambda b: next(f"{b / 1024**i:.1f} {u}"
                          for i, u in ((3, "GB"), (2, "MB"), (1, "KB"), (0, "B"))
                          if b >= 1024**i or not i)
    age = lambda s: next(f"{s / d:.0f}{u}"
                         for d, u in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s"))
                         if s >= d or d == 1)
    num = lambda v: "-" if v is None else str(v)
    table = [("name", "iter", "epoch", "val_loss", "size", "age", "status")]
    for r in rows:
        status = "ok" if r["ok"] else "not verified" if r["ok"] is None else f"BAD: {r['error']}"
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        table.append((r["name"], num(r["iter"]), num(r["epoch"]), val, size(r["bytes"]),
                      age(r["age_s"]), status))
    w = [max(len(row[i]) for row in table) for i in range(7)]
    lines = ["  ".join(c.ljust(w[i]) if i in (0, 6) else c.rjust(w[i])
                       for i, c in enumerate(row)).rstrip()
             for row in table]
    disk = disk_bytes(r["path"] for r in rows)
    return "\n".join(lines + [f"{len(rows)} checkpoint files, {size(disk)} on disk "
                              "(hard links counted once)"])

# -----------------------------------------------------------------------------
# saving in the background

class Writer:
    """Saves tiers (save_tiers) and prints one line per save. In a background thread,
    training blocks only for a snapshot of the state: a copy into a buffer kept between saves (on a
    GPU, pinned host memory the copy is queued into; fresh memory each time would cost more in page
    faults than the copy).
    At most one save is in flight: the next one first waits for it. A failed write surfaces as
    Error at the next save() or wait(); the files it would have replaced are intact.
    With background=False save() writes in the calling thread, as save_tiers does."""

    def __init__(self, background=True):
        self.background, self.thread, self.error, self.done = background, None, None, None
        # the snapshot buffer and the state layout it was made for
        self.flat, self.layout = None, None

    def save(self, out_dir, state, names, keep=None, protect=()) -> float:
        """Start saving state under the tier names (save_tiers); returns the seconds the caller
        was blocked."""
        t0 = time.time()
        self.wait()
        tiers = dict(names=names, keep=keep, protect=protect)
        if not self.background:
            self._write(out_dir, state, None, tiers)
            self.wait()
            return time.time() - t0
        state, ready = self._snapshot(state)
        self.thread = threading.Thread(target=self._write, args=(out_dir, state, ready, tiers),
                                       daemon=True)
        self.thread.start()
        return time.time() - t0

    def wait(self):
        """Wait for the save in flight; returns (names, disk bytes, seconds) of the last finished
        one."""
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
            print(f"saved {', '.join(names)}{where} in {self.done[2]:.2f}s; checkpoints use "
                  f"{disk / 2**20:.1f} MB", flush=True)
        except Exception as e:  # reported by the next save() or wait(), in the training thread
            why = e if isinstance(e, Error) else f"cannot save: {oneline(e)}"
            self.error = Error(f"{why} (earlier checkpoints are intact)")

    def _snapshot(self, tree):
        """A copy of tree whose tensors are views into one flat buffer of this writer, kept between
        saves while the state's layout stays the same (on a GPU it is pinned and the copies are only
        queued). One buffer, not one per tensor: the pinned allocator rounds every allocation up to
        a power of two, so GPT-2 small's 1.39 GiB state held 2.3 GiB of page-locked memory as
        separate buffers. Tensors that alias each other (tied weights) get one view, so the file is
        the same as from tree."""
        def alias(x):
            return (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.shape,
                    x.stride(), x.dtype)
        offsets, layout, size = {}, [], 0
        for x in _tensors(tree):
            if alias(x) not in offsets:
                offsets[alias(x)] = size
                layout.append((x.shape, x.dtype))
                # each view starts 64-byte aligned
                size += -(-x.numel() * x.element_size() // 64) * 64
        cuda = any(key[0].type == "cuda" for key in offsets)
        if layout != self.layout:
            self.flat, self.layout = torch.empty(size, dtype=torch.uint8, pin_memory=cuda), layout
        views = {}
        def copy_of(x):
            key = alias(x)
            if key not in views:
                nbytes = x.numel() * x.element_size()
                flat = self.flat[offsets[key]:offsets[key] + nbytes]
                views[key] = flat.view(x.dtype).view(x.shape)
                views[key].copy_(x.detach(), non_blocking=x.is_cuda)
            return views[key]
        out = _map_tensors(tree, copy_of)
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        return out, ready


def _tensors(tree):
    """The tensors of a state tree, in walk order."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def _map_tensors(tree, fn):
    """tree with fn(tensor) for each tensor and a deep copy of everything else."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_map_tensors(v, fn) for v in tree]
        return tuple(items) if isinstance(tree, tuple) else items
    return copy.deepcopy(tree)
