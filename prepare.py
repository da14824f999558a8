"""
Prepare a token dataset for train.py: read text documents, train (or reuse) a tokenizer, and write
data/NAME/{train.bin, val.bin, meta.json, tokenizer.json} (format: see dataset.py).

With no arguments it prepares the running Python's own standard library .py sources (without
site-packages and test directories) as data/stdlib, with a byte-level BPE of 8192 tokens:

    python prepare.py
    python prepare.py --input=shakespeare.txt --tokenizer=byte          # -> data/shakespeare
    python prepare.py --input=notes/ --glob='*.md' --dataset=notes --vocab_size=16384
    python prepare.py --input=chat.jsonl --text_key=content --tokenizer=data/stdlib/tokenizer.json
    python prepare.py --tokenizer=gpt2 --dataset=stdlib_gpt2 --force
    python prepare.py --input=kormed/ --tokenizer=data/stdlib/tokenizer.json --extend_vocab=1024
    python prepare.py --input=big.jsonl --max_docs=1000 --dataset=big_quick   # a quick run's slice

Each file, or each JSONL record, is one document, followed by an end-of-text token. Files are
read in pieces of at most 128 KiB cut at line ends, and each piece (so each small document) goes
to val or train by a hash of its path and index: deterministic, and one huge .txt still gets a val
split. Re-running with unchanged inputs and settings reuses the output in well under a second;
--force rebuilds. Everything is written to data/.NAME.tmp-PID first and renamed into place only
when complete, so a crash or Ctrl-C never leaves a half-written dataset.

--extend_vocab=N with --tokenizer=BASE/tokenizer.json learns N more BPE merges on this corpus on top
of the base's: every base token keeps its id and the new tokens get ids V..V+N-1 (V: the base's
vocabulary size, its end-of-text included), so a model trained on the base fine-tunes on the new
text with its embeddings grown (model.resize_vocab). meta.json records the base under
tokenizer.extends. --max_docs=N keeps only the first N documents: files in sorted path order,
JSONL records in file order.

Question/answer data: a JSONL or Parquet record with `prompt` and `completion` (strings) is a pair,
one with `messages` ([{"role": "system" | "user" | "assistant", "content": ...}, ...]) a
conversation, rendered with --template (default: role prefixes on their own lines, see
dataset.TEMPLATE) and recorded in meta.json so that inference renders prompts the same way. Every
token is flagged trained or not (train.mask, val.mask): a completion, each assistant turn's content
and the end-of-text after it train, prompts and user / system turns do not; each example's first
token is in train.idx / val.idx, so training packs whole examples into its windows. A dataset of
plain documents only has no flags at all. Each segment (a prompt, a role prefix, a content) is
encoded on its own, as sample.py and evaluate.py encode a prompt.

    python prepare.py --input=qa.jsonl --tokenizer=data/stdlib/tokenizer.json --dataset=qa
    python prepare.py --input=chat/ --glob='*.parquet' --template=my_template.json
"""
import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import stat
import sys
import sysconfig
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

import dataset as ds
import files
from configurator import configure
from errors import Error, oneline, report

# -----------------------------------------------------------------------------
# inputs (string defaults, not None, so that a value is taken as typed: --dataset=2024 is a name)
# a file (.txt, .jsonl, any text) or folder; repeat --input for several
input = ''  # '': this Python's stdlib
glob = ''  # file name pattern inside folders; '': * (*.py for the stdlib)
text_key = 'text'  # the JSONL / Parquet field holding a document's text
prompt_key = 'prompt'  # ... a pair's prompt (not trained)
completion_key = 'completion'  # ... a pair's completion (trained)
messages_key = 'messages'  # ... a conversation's turns [{role, content}] (the assistant's trained)
# conversations' template: {"system": ..., "user": ..., "assistant": ...}, each with {content}, as
# JSON text or a .json file; '': role prefixes on their own lines (dataset.TEMPLATE)
template = ''
dataset = ''  # output name: data_dir/NAME; '': stdlib, or the first input's name
data_dir = 'data'  # root folder of datasets
tokenizer = 'bpe'  # bpe (train one), gpt2, byte, or a tokenizer.json (or its folder) to reuse
vocab_size = 8192  # the BPE's vocabulary, end-of-text included (257..65535)
bpe_train_bytes = 1e8  # train the BPE on a deterministic train-split sample of about this size
extend_vocab = None  # with tokenizer=PATH/tokenizer.json: learn N more BPE merges; base ids stay
# for quick runs: keep only the first N documents (files sorted by path, JSONL records in order)
max_docs = None
val_fraction = 0.05  # share of pieces that go to val
min_split_tokens = 1025  # fewest tokens per split of plain text (block_size + 1)
strict = False  # abort on a bad file inside a folder instead of skipping it
force = False  # rebuild even if up to date
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}

PIECE_BYTES = 128 * 1024  # split unit of big documents; also bounds the text held per piece
BATCH_BYTES = 1 << 20     # text handed to one encode thread at a time
STDLIB_EXCLUDE = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")
SHOW_SKIPPED = 5  # skipped files named in the summary; meta.json lists them all


class BadFile(Error):
    """A file that is not usable text: skipped inside a folder, an error when named."""


def list_sources(roots, glob, exclude):
    """[(path, key, explicit, size, mtime_ns)] of every input file, in a reproducible order."""
    sources = []
    for root in roots:
        if os.path.isfile(root):
            st = os.stat(root)
            sources.append((root, os.path.basename(root), True, st.st_size, st.st_mtime_ns))
            continue
        # a FIFO, socket or device: reading would block
        if os.path.exists(root) and not os.path.isdir(root):
            raise Error(f"--input={root} is not a regular file or a folder")
        if not os.path.isdir(root):
            raise Error(f"--input={root}: no such file or directory (check the path)")
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            # .git etc. are not walked
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in exclude]
            found += [os.path.join(dirpath, f) for f in filenames
                      if not f.startswith(".") and fnmatch.fnmatch(f, glob)]
        base = os.path.basename(os.path.abspath(root))
        for path in sorted(found):
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):  # a FIFO or socket would block the read
                sources.append((path, f"{base}/{os.path.relpath(path, root)}", False, st.st_size,
                                st.st_mtime_ns))
    return sources


def read_pieces(path, key, fmt):
    """Yield (piece key, content, ends_document, source bytes) for one file; raise BadFile if
    unusable. content is text, or a pair's or conversation's segments (dataset.segments). A .jsonl
    line or a .parquet row is one piece; other files are cut at line ends into pieces of at most
    PIECE_BYTES. fmt: the record fields (text_key, ...) and the conversations' template."""
    if path.endswith(".parquet"):
        yield from read_parquet(path, key, fmt)
        return
    with open(path, "rb") as f:
        if path.endswith(".jsonl"):
            n = 0
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise BadFile(f"{path}:{lineno}: invalid JSON ({e}); "
                                  f"expected one JSON object per line")
                content = record_content(record, fmt, f"{path}:{lineno}")
                if content:
                    yield f"{key}\0{n}", content, True, len(line)
                n += 1
            return
        offset, n, rest, pending = 0, 0, b"", None
        while block := rest + f.read(PIECE_BYTES - len(rest)):
            cut = len(block)
            if len(block) == PIECE_BYTES:  # more may follow: end the piece at a line end
                cut = block.rfind(b"\n") + 1 or char_boundary(block)
            piece, rest = block[:cut], block[cut:]
            if b"\0" in piece:
                raise BadFile(f"{path}: binary file (NUL bytes)")
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadFile(f"{path}: not UTF-8 text (bad byte at offset {offset + e.start})")
            if pending:
                yield pending[0], pending[1], False, pending[2]
            pending = (f"{key}\0{n}", text, len(piece))
            offset, n = offset + len(piece), n + 1
        if pending:  # the last piece ends the document (an empty file gives no document)
            yield pending[0], pending[1], True, pending[2]


def read_parquet(path, key, fmt):
    """read_pieces of a Parquet file: a row is a record, read a batch of rows at a time and only
    the columns its format needs, so memory stays bounded whatever the file's size."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadFile(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as e:  # not Parquet, or damaged: pyarrow's own words
        raise BadFile(f"{path}: not a Parquet file ({oneline(e)})") from None
    formats = ([fmt["messages_key"]], [fmt["prompt_key"], fmt["completion_key"]], [fmt["text_key"]])
    columns = next((c for c in formats if set(c) <= set(names)), None)
    if columns is None:
        raise BadFile(f"{path}: no column {fmt['text_key']!r}, {fmt['prompt_key']!r} and "
                      f"{fmt['completion_key']!r}, or {fmt['messages_key']!r} (it has "
                      f"{', '.join(names)}; set --text_key, --prompt_key, --completion_key or "
                      f"--messages_key)")
    n = 0
    try:
        for rows in parquet.iter_batches(batch_size=256, columns=columns):
            for record in rows.to_pylist():
                content = record_content(record, fmt, f"{path}, row {n + 1}")
                if content:
                    yield f"{key}\0{n}", content, True, len(text_of(content).encode())
                n += 1
    except BadFile:
        raise
    except Exception as e:  # a damaged page, found while reading
        raise BadFile(f"{path}, row {n + 1}: unreadable Parquet ({oneline(e)})") from None


def record_content(record, fmt, where):
    """A record's text (a document, '' for an empty one), or (kind, segments) of a pair or a
    conversation; BadFile naming where it is for a record of none of the formats."""
    try:
        segments = ds.segments(record, fmt, fmt["template"])
    except Error as e:
        raise BadFile(f"{where}: {e}") from None
    if fmt["messages_key"] in record:
        return "conversation", segments
    return ("pair", segments) if fmt["prompt_key"] in record else "".join(t for t, _ in segments)


def text_of(content):
    """A piece's text: a document's, or a pair's or conversation's segments joined."""
    return content if isinstance(content, str) else "".join(t for t, _ in content[1] if t)


def char_boundary(block):
    """The last cut in block that does not split a UTF-8 character (for a line longer than a
    piece)."""
    for i in range(1, min(4, len(block)) + 1):
        if block[-i] < 0x80:  # ASCII: a character ends here
            return len(block) - i + 1
        if block[-i] >= 0xC0:  # a lead byte: cut before its character
            return len(block) - i
    return len(block)  # not UTF-8; decoding will say so


def piece_hash(key):
    """Two independent uniform numbers in [0, 1) for a piece: its split, and its BPE-sample draw."""
    # surrogateescape: any file name
    h = hashlib.blake2b(key.encode(errors="surrogateescape"), digest_size=16).digest()
    return int.from_bytes(h[:8], "little") / 2**64, int.from_bytes(h[8:], "little") / 2**64


def main(argv=None) -> dict:
    """Prepare the dataset that argv (default sys.argv[1:]) describes; returns its meta.json."""
    config, _ = configure(defaults, sys.argv[1:] if argv is None else argv, source=__file__,
                          repeatable={'input'})
    return prepare(SimpleNamespace(**config))


def prepare(args):
    """Prepare the dataset that args (the resolved config, as attributes) describes; returns its
    meta.json."""
    t0 = time.time()
    # -------------------------------------------------------------------------
    # inputs, settings, and the cache check (stat only, no heavy imports before it)
    # None defaults take any value: these must be whole numbers
    for key in ('extend_vocab', 'max_docs'):
        value = getattr(args, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise Error(f"--{key}={value!r} must be a whole number (e.g. 1000)")
    args.bpe_train_bytes = int(args.bpe_train_bytes)  # a float default, so that 1e8 is accepted
    inputs = [args.input] if isinstance(args.input, str) else args.input
    if any(inputs):
        roots, glob, exclude = inputs, args.glob or "*", ()
    else:
        stdlib = sysconfig.get_paths()["stdlib"]
        roots, glob, exclude = [stdlib], args.glob or "*.py", STDLIB_EXCLUDE
    if args.dataset:
        name = args.dataset
    elif any(inputs):
        name = os.path.splitext(os.path.basename(os.path.normpath(roots[0])))[0]
    else:
        name = "stdlib"
    if not name or name.startswith(".") or os.sep in name:
        raise Error(f"--dataset={name!r} is not a plain folder name (e.g. --dataset=mydata)")
    if not 0.0 < args.val_fraction < 1.0:
        raise Error(f"--val_fraction={args.val_fraction} must be between 0 and 1 (e.g. 0.05)")
    if args.bpe_train_bytes < 1:
        raise Error(f"--bpe_train_bytes={args.bpe_train_bytes} must be at least 1 "
                    f"(default 100000000)")
    if args.min_split_tokens < 2:
        raise Error(f"--min_split_tokens={args.min_split_tokens} must be at least 2 "
                    f"(block_size + 1)")
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise Error(f"--data_dir={args.data_dir} is a file, not a folder")
    for root in roots:  # reading a prepared dataset as text would rebuild it from its own files
        folder = os.path.abspath(root)
        while (folder != os.path.dirname(folder)
               and not os.path.isfile(os.path.join(folder, "meta.json"))):
            folder = os.path.dirname(folder)
        if (os.path.isfile(os.path.join(folder, "meta.json"))
                and os.path.isfile(os.path.join(folder, "train.bin"))):
            raise Error(f"--input={root} is inside the prepared dataset {folder}; "
                        f"give the corpus it was made from instead")
    kind, tokenizer_path = args.tokenizer, None
    if kind not in ds.KINDS:
        tokenizer_path = os.path.join(kind, "tokenizer.json") if os.path.isdir(kind) else kind
        if not os.path.isfile(tokenizer_path):
            raise Error(f"--tokenizer={kind}: no such file (use bpe, gpt2, byte, "
                 f"or the path of a tokenizer.json, e.g. data/stdlib/tokenizer.json)")
        kind = "bpe"
    elif kind == "bpe" and not 257 <= args.vocab_size <= np.iinfo(ds.DTYPE).max:
        raise Error(f"--vocab_size={args.vocab_size} does not fit the uint16 token files "
                    f"(use 257..65535)")
    if args.extend_vocab is not None and (not tokenizer_path or args.extend_vocab <= 0):
        raise Error(f"--extend_vocab={args.extend_vocab} needs a positive number of new tokens "
                    f"and --tokenizer=PATH/tokenizer.json, the base to extend "
                    f"(e.g. --tokenizer=data/stdlib/tokenizer.json)")
    if args.max_docs is not None and args.max_docs <= 0:
        raise Error(f"--max_docs={args.max_docs} must be a positive number of documents "
                    f"(e.g. 1000)")

    # the record fields and the conversations' template: a template that cannot render, now
    fmt = {k: getattr(args, k) for k in ds.KEYS}
    fmt["template"] = ds.read_template(args.template)
    sources = list_sources(roots, glob, exclude)
    if not sources:
        raise Error(f"no input files in {', '.join(roots)} match --glob={glob} "
                    f"(check --input/--glob)")
    total_bytes = sum(s[3] for s in sources)
    listing = "".join(f"{os.path.abspath(p)}\t{size}\t{mtime}\n"
                      for p, _, _, size, mtime in sources)
    # stat only: fast
    inputs_fingerprint = hashlib.sha256(listing.encode(errors="surrogateescape")).hexdigest()
    settings = dict(format_version=ds.FORMAT_VERSION, inputs=[os.path.abspath(r) for r in roots],
                    glob=glob, exclude=list(exclude), text_key=args.text_key,
                    tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                    piece_bytes=PIECE_BYTES)
    if tokenizer_path:
        with open(tokenizer_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
            settings["tokenizer"] = f"{os.path.abspath(tokenizer_path)} sha256:{digest}"
    elif kind == "bpe":
        settings.update(vocab_size=args.vocab_size, bpe_train_bytes=args.bpe_train_bytes)
    # set only when used: datasets prepared before these flags keep their cache key
    if args.extend_vocab:
        settings.update(extend_vocab=args.extend_vocab, bpe_train_bytes=args.bpe_train_bytes)
    if args.max_docs:
        settings.update(max_docs=args.max_docs)
    settings.update({k: fmt[k] for k in ds.KEYS[1:] if fmt[k] != defaults[k]})
    if args.template:
        settings.update(template=fmt["template"])

    out_dir = os.path.join(args.data_dir, name)
    for root in roots:
        root_path = os.path.abspath(root)
        if os.path.commonpath([root_path, os.path.abspath(out_dir)]) == root_path:
            raise Error(f"--input={root} contains the output folder {out_dir}; "
                 f"keep the corpus and --data_dir apart")
    cap = f", keeping the first {args.max_docs} documents" if args.max_docs else ""
    print(f"prepare: dataset {name}: {len(sources)} files, {total_bytes / 1e6:.1f} MB{cap} "
          f"-> {out_dir} (tokenizer {args.tokenizer})")
    try:
        old = ds.read_meta(out_dir)
    except Error:
        old = None  # missing, damaged or an older format: build it
    if (old and not args.force and old["settings"] == settings
            and old["inputs_fingerprint"] == inputs_fingerprint
            and not (args.strict and old["inputs"]["skipped"])
            and (old.get("flagged")
                 or min(s["tokens"] for s in old["splits"].values()) >= args.min_split_tokens)):
        print(f"prepare: {out_dir} is up to date, reused it "
              f"(inputs and settings unchanged; --force rebuilds)")
        return old

    files.clean_stale(out_dir)
    tmp_dir = files.temp_dir(out_dir)
    try:
        try:
            os.makedirs(tmp_dir)
        except OSError as e:
            raise Error(f"cannot write in --data_dir={args.data_dir}: {oneline(e)}") from None
        meta = build(args, fmt, sources, kind, tokenizer_path, tmp_dir, out_dir)
        meta.update(dataset=name, inputs_fingerprint=inputs_fingerprint, settings=settings,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    prepare_seconds=round(time.time() - t0, 3))
        ds.publish(tmp_dir, out_dir, meta)
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end the progress line
        shutil.rmtree(tmp_dir, ignore_errors=True)
        print(f"prepare: interrupted; {out_dir} was left as it was", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # os._exit, not sys.exit: interpreter shutdown with the BPE trainer's Rust thread still
        # running can abort the process (SIGABRT) after our message
        os._exit(1)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    skipped = list(meta["inputs"]["skipped"].values())  # each reason names its file
    print(f"prepare: wrote {out_dir}: train {tr['tokens']:,} tokens ({tr['documents']:,} docs), "
          f"val {va['tokens']:,} tokens ({va['documents']:,} docs), {len(skipped)} files skipped")
    for reason in skipped[:SHOW_SKIPPED]:
        print(f"prepare: skipped {reason}")
    if len(skipped) > SHOW_SKIPPED:
        print(f"prepare: skipped ... and {len(skipped) - SHOW_SKIPPED} more "
              f"(all in {out_dir}/meta.json, inputs.skipped)")
    trained = ""
    if meta["bpe_train_seconds"]:
        trained = f"BPE training {meta['bpe_train_seconds']:.1f}s, "
    read = tr["bytes"] + va["bytes"]  # with max_docs, only what was read, not every matched file
    print(f"prepare: {read / 1e6:.1f} MB in {meta['prepare_seconds']:.1f}s ({trained}encoding "
          f"{meta['encode_seconds']:.1f}s at {meta['encode_mb_per_s']:.1f} MB/s, "
          f"{meta['encode_tokens_per_s'] / 1e6:.2f}M tok/s)")
    return meta


def build(args, fmt, sources, kind, tokenizer_path, tmp_dir, out_dir):
    """Read, tokenize and write everything into tmp_dir; returns meta.json without the cache
    keys."""
    # a tokenizer that needs no training loads first: a bad tokenizer.json or an offline gpt2
    # fails fast
    state = None
    if tokenizer_path:
        with open(tokenizer_path, "rb") as f:
            state = ds.make_state("bpe", f.read().decode("utf-8", errors="replace"), tokenizer_path)
        if args.extend_vocab and state["vocab_size"] + args.extend_vocab > np.iinfo(ds.DTYPE).max:
            raise Error(f"--extend_vocab={args.extend_vocab} on {tokenizer_path}'s "
                        f"{state['vocab_size']} tokens makes more than 65535, which the uint16 "
                        f"token files cannot hold (use at most "
                        f"--extend_vocab={np.iinfo(ds.DTYPE).max - state['vocab_size']})")
    elif kind != "bpe":
        state = ds.make_state(kind)

    # -------------------------------------------------------------------------
    # pass 1: read every document once before writing anything, so that bad files fail or are
    # skipped up front, and so a split that the hash leaves empty can get one piece anyway
    skipped, counts, lowest, highest, good, docs, total_bytes = {}, [0, 0], None, None, [], 0, 0
    flagged = conversations = False  # any pair or conversation: flags; any conversation: template
    # max_docs: no total
    with bar("reading", None if args.max_docs else sum(s[3] for s in sources)) as reading:
        for source in sources:
            path, key, explicit, _, _ = source
            if docs == args.max_docs:
                break  # --max_docs: the later files are not read at all
            n, low, high, file_docs, file_bytes = [0, 0], None, None, 0, 0
            try:
                for piece_key, content, end, nbytes in read_pieces(path, key, fmt):
                    reading.update(nbytes)
                    flagged |= not isinstance(content, str)
                    conversations |= content[0] == "conversation"
                    u = (piece_hash(piece_key)[0], piece_key)
                    n[u[0] < args.val_fraction] += 1
                    low, high = min(low or u, u), max(high or u, u)
                    file_docs, file_bytes = file_docs + end, file_bytes + nbytes
                    if docs + file_docs == args.max_docs:
                        break
            except BadFile as e:
                if explicit or args.strict:
                    fix = ("fix or remove it" if explicit
                           else "fix or remove it, or drop --strict to skip it")
                    raise Error(f"{e} ({fix})")
                skipped[path] = str(e)
                continue
            counts = [counts[0] + n[0], counts[1] + n[1]]
            if low:
                lowest, highest = min(lowest or low, low), max(highest or high, high)
            good.append(source)
            docs, total_bytes = docs + file_docs, total_bytes + file_bytes
    if not lowest:
        why = "it is empty"
        if skipped:
            why = f"all {len(skipped)} files were skipped, e.g. {next(iter(skipped.values()))}"
        raise Error(f"no text to prepare: {why} (check --input, --glob and --text_key)")
    force_val = lowest[1] if counts[1] == 0 else None     # the hash sent nothing to val
    force_train = highest[1] if counts[0] == 0 else None  # ... or everything

    def pieces():
        """(is_val, text, ends_document, source bytes, bpe sample draw) of every good piece."""
        docs = 0
        for path, key, _, _, _ in good:
            for piece_key, text, end, nbytes in read_pieces(path, key, fmt):
                u, v = piece_hash(piece_key)
                is_val = ((u < args.val_fraction or piece_key == force_val)
                          and piece_key != force_train)
                yield is_val, text, end, nbytes, v
                docs += end
                if docs == args.max_docs:
                    return

    # -------------------------------------------------------------------------
    # tokenizer: train the BPE, or extend the base's, on (a deterministic sample of) the train split
    t_bpe = time.time()
    trained = state is None or bool(args.extend_vocab)
    train_bytes = total_bytes * (1 - args.val_fraction)
    share = min(1.0, args.bpe_train_bytes / train_bytes)

    def sample(progress=None):
        """The BPE's training texts: the train pieces whose draw falls under `share`."""
        for is_val, text, _, nbytes, v in pieces():
            if progress is not None:
                progress.update(nbytes)  # every piece is read to draw the sample
            if not is_val and v < share:
                yield text_of(text)
    sample_mb = min(args.bpe_train_bytes, train_bytes) / 1e6
    if args.extend_vocab:
        base = state
        print(f"prepare: extending {tokenizer_path} ({base['vocab_size']} tokens) "
              f"by {args.extend_vocab} BPE merges learned on {sample_mb:.1f} MB of the train split")
        # the merges after it take far less time
        with bar("counting words", total_bytes) as counting:
            json_text = ds.extend_bpe(base["json"], sample(counting), args.extend_vocab,
                                      tokenizer_path)
        state = ds.make_state("bpe", json_text)
        state["extends"] = {"fingerprint": base["fingerprint"], "vocab_size": base["vocab_size"]}
        if state["vocab_size"] < base["vocab_size"] + args.extend_vocab:
            print(f"prepare: learned only {state['vocab_size'] - base['vocab_size']} merges: "
                  f"the sample has no more pairs to merge")
    elif trained:
        print(f"prepare: training a {args.vocab_size}-token BPE on {sample_mb:.1f} MB "
              f"of the train split")
        result = {}
        # then the merges, typically a few seconds, without a bar
        reading = bar("BPE sample", total_bytes)

        def train():
            try:
                # not HF's own progress bars: they write blank lines to stdout
                result["json"] = ds.train_bpe(sample(reading), args.vocab_size, show_progress=False)
            except Exception as e:
                result["error"] = e
        # train in a daemon thread: Rust would hold the main thread, and Ctrl-C wait for it
        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        trainer.join()
        reading.close()
        if "error" in result:
            raise result["error"]
        state = ds.make_state("bpe", result["json"])
    bpe_seconds = time.time() - t_bpe if trained else 0.0
    tok = ds.load_tokenizer(state)
    if state["json"] is not None:
        with open(os.path.join(tmp_dir, "tokenizer.json"), "wb") as f:
            f.write(state["json"].encode("utf-8"))

    # -------------------------------------------------------------------------
    # pass 2: encode batches of pieces on all cores, write them in order as they finish
    eot = np.array([tok.eot_id], dtype=ds.DTYPE)

    def encode(batch):  # runs in a worker thread; tiktoken releases the GIL while it encodes
        """Per split: (ids, flags or None, each piece's token count) of the batch's pieces: a
        document's text in one piece, a pair's or conversation's segments each on their own."""
        segs = [[(c, True)] if isinstance(c, str) else c[1] for _, c, _, _, _ in batch]
        encoded = iter(tok.encode_batch([t for s in segs for t, _ in s if t is not None]))
        parts = ([], []), ([], [])  # per split: ids and flags arrays
        lengths = ([], [])
        for (is_val, _, end, _, _), s in zip(batch, segs):
            n = 0
            for text, trained in s + [(None, True)] * end:  # a document ends with end-of-text
                a = eot if text is None else next(encoded)
                parts[is_val][0].append(a)
                parts[is_val][1].append(np.full(len(a), trained, dtype=np.uint8))
                n += len(a)
            lengths[is_val].append(n)
        return [(np.concatenate(ids) if ids else eot[:0],
                 (np.concatenate(fl) if fl else np.zeros(0, np.uint8)) if flagged else None, n)
                for (ids, fl), n in zip(parts, lengths)]

    def batches():
        batch, size = [], 0
        for item in pieces():
            batch.append(item)
            size += item[3]
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    splits = {s: dict(tokens=0, documents=0, pieces=0, bytes=0) for s in ds.SPLITS}
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    t_enc = time.time()
    # per split: .bin, and for flagged data .mask and .idx
    names = [f"{s}{ext}" for ext in (".bin", ".mask", ".idx")[:1 + 2 * flagged] for s in ds.SPLITS]
    files = {n: open(os.path.join(tmp_dir, n), "wb") for n in names}
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(workers) as pool, \
            bar("encoding", total_bytes) as encoding:
        for f in files.values():
            stack.enter_context(f)
        inflight = deque()
        for batch in batches():
            inflight.append((batch, pool.submit(encode, batch)))
            if len(inflight) > 2 * workers:  # a bounded queue keeps memory flat for any corpus size
                write(inflight.popleft(), files, splits, encoding, t_enc)
        while inflight:
            write(inflight.popleft(), files, splits, encoding, t_enc)
    encode_seconds = time.time() - t_enc
    done = sum(v["bytes"] for v in splits.values())

    # plain text needs a whole window per split; packed examples are padded to one
    small = {s: v["tokens"] for s, v in splits.items()
             if v["tokens"] < args.min_split_tokens and not flagged}
    if small:
        raise Error("corpus too small: "
                    + ", ".join(f"{s} has {n} tokens" for s, n in small.items())
                    + f", each split needs at least --min_split_tokens={args.min_split_tokens} "
                    f"(add more text, or change --val_fraction / --min_split_tokens); "
                    f"{out_dir} was left as it was")
    tokens = sum(v["tokens"] for v in splits.values())
    if flagged:
        print("prepare: trained (flagged): " + ", ".join(f"{v['trained_tokens']:,} of {s}'s "
                                                         f"{v['tokens']:,} tokens"
                                                         for s, v in splits.items())
              + (" (conversations rendered with the template in meta.json)" * conversations))
    return dict(format_version=ds.FORMAT_VERSION,
                **({"flagged": True} if flagged else {}),
                **({"template": fmt["template"]} if conversations else {}),
                tokenizer={k: state[k]
                           for k in ("kind", "fingerprint", "vocab_size", "eot_id", "extends")
                           if k in state},
                dtype=np.dtype(ds.DTYPE).name, splits=splits,
                inputs=dict(files=len(sources), bytes=sum(s[3] for s in sources), skipped=skipped),
                bpe_train_seconds=round(bpe_seconds, 3), encode_seconds=round(encode_seconds, 3),
                encode_mb_per_s=round(done / 1e6 / max(encode_seconds, 1e-9), 2),
                encode_tokens_per_s=round(tokens / max(encode_seconds, 1e-9)))


def write(item, files, splits, progress, t_start):
    """Append one encoded batch to train.bin / val.bin (and to flagged data's .mask and .idx: its
    flags, and where each piece begins), counting it in splits and on the progress bar."""
    batch, future = item
    for split, (ids, flags, lengths) in zip(ds.SPLITS, future.result()):
        if flags is not None:
            flags.tofile(files[f"{split}.mask"])
            ends = splits[split]["tokens"] + np.cumsum(lengths, dtype=np.uint64)
            (ends - np.asarray(lengths, dtype=np.uint64)).tofile(files[f"{split}.idx"])
            trained = splits[split].get("trained_tokens", 0)
            splits[split]["trained_tokens"] = trained + int(flags.sum())
        ids.tofile(files[f"{split}.bin"])
        splits[split]["tokens"] += len(ids)
    for is_val, text, end, nbytes, _ in batch:
        s = splits[ds.SPLITS[is_val]]
        s["pieces"] += 1
        s["documents"] += end
        s["bytes"] += nbytes
    progress.update(sum(item[3] for item in batch))
    tokens = sum(s["tokens"] for s in splits.values())
    rate = tokens / 1e6 / max(time.time() - t_start, 1e-9)
    progress.set_postfix_str(f"{rate:.2f}M tok/s", refresh=False)


def bar(stage, total_bytes):
    """tqdm's progress bar (bytes, rate, ETA) for a stage, on stderr. Only on a terminal:
    disable=None turns it off when stderr is a file or a pipe, where a log wants the plain lines
    this script prints to stdout (what was read, the time each stage took), not redraws joined by
    carriage returns."""
    return tqdm(total=total_bytes, desc=f"prepare: {stage}", unit="B", unit_scale=True, leave=False,
                disable=None, file=sys.stderr, dynamic_ncols=True)


if __name__ == "__main__":
    sys.excepthook = report  # an Error is one line, 'prepare.py: error: ...'
    main()
