"""
The token dataset format, written by prepare.py and read by train.py / sample.py, and the
tokenizers behind it.

A dataset is a folder data/<name>/ holding
    train.bin, val.bin   raw uint16 token ids, no header (np.memmap-able)
    meta.json            format version, tokenizer, token/document counts, inputs and settings
    tokenizer.json       the byte-level BPE (only for tokenizer kind "bpe")
and, for data with tokens that do not train (question/answer records: meta.json's "flagged"),
    train.mask, val.mask one uint8 a token: 1 where it trains (answers), 0 where not (prompts)
    train.idx, val.idx   uint64 offset of each example's first token (a record, or a piece of a
                         text file), so that training packs whole examples into windows

Tokenizer kinds: "bpe" (a byte-level BPE trained by prepare.py, or a base one that extend_bpe grew
by more merges, stored as HF tokenizers' tokenizer.json), "gpt2" (tiktoken's GPT-2 encoding) and
"byte" (raw UTF-8 bytes). All three run as tiktoken Encodings: one encode/decode path, and much
faster than HF's encoder.
"""
import functools
import hashlib
import json
import math
import os

import numpy as np

import files
from errors import Error

FORMAT_VERSION = 1
DTYPE = np.uint16
SPLITS = ("train", "val")
KINDS = ("bpe", "gpt2", "byte")  # tokenizer kinds: make_state and load_tokenizer build each
EOT = "<|endoftext|>"
# HF ByteLevel's pre-tokenizer regex (GPT-2's), so tiktoken splits text exactly like HF does
GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
BYTE_PAT = r"[\s\S]{1,256}"  # any cut works for single-byte tokens; long runs are just faster
FETCH_TIMEOUT = 30  # seconds; tiktoken downloads with requests, which has no timeout of its own

# -----------------------------------------------------------------------------
# reading a prepared dataset

def read_meta(data_dir) -> dict:
    """meta.json of a complete dataset, checked against the format version and the .bin sizes."""
    path = os.path.join(data_dir, "meta.json")
    name = os.path.basename(os.path.normpath(data_dir))
    for folder in (os.path.dirname(os.path.normpath(data_dir)), data_dir):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise Error(f"{folder} is a file, not a folder (check --data_dir and --dataset)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise Error(f"{path} not found "
                    f"(prepare it first: python prepare.py --dataset={name} ...)") from None
    except (OSError, ValueError) as e:
        raise Error(f"{path} is unreadable: {e} "
                    f"(rebuild it: python prepare.py --force ...)") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise Error(f"{path} has format_version {version}, this code reads {FORMAT_VERSION} "
                           f"(rebuild it: python prepare.py --force ...)")
    tok = meta.get("tokenizer")
    if not (isinstance(tok, dict) and tok.get("kind") in KINDS
            and isinstance(tok.get("vocab_size"), int)
            and 1 <= tok["vocab_size"] <= np.iinfo(DTYPE).max + 1
            and isinstance(tok.get("eot_id"), int)
            and 0 <= tok["eot_id"] < tok["vocab_size"]):
        raise Error(f"{path} has no usable tokenizer record (kind, vocab_size, eot_id) "
                           f"(the dataset is damaged; rebuild it: python prepare.py --force ...)")
    for split in SPLITS:
        p = os.path.join(data_dir, f"{split}.bin")
        try:
            expected = meta["splits"][split]["tokens"] * np.dtype(DTYPE).itemsize
        except (KeyError, TypeError):
            raise Error(f"{path} lacks the {split} token count "
                        f"(rebuild it: python prepare.py --force ...)") from None
        sizes = {p: expected}
        if meta.get("flagged"):  # a flag per token, an offset per example
            pieces = meta["splits"][split].get("pieces")
            sizes[os.path.join(data_dir, f"{split}.mask")] = expected // np.dtype(DTYPE).itemsize
            pieces = pieces if isinstance(pieces, int) else -1
            sizes[os.path.join(data_dir, f"{split}.idx")] = 8 * pieces
        for p, expected in sizes.items():
            size = os.path.getsize(p) if os.path.exists(p) else -1
            if size != expected:
                raise Error(f"{p} has {size} bytes, meta.json says {expected} (the dataset is "
                            f"damaged; rebuild it: python prepare.py --force ...)")
    return meta


def fingerprint(meta) -> str:
    """Identity of a dataset's token streams: its inputs, every setting and the tokenizer.
    Checkpoints keep it, so a run never resumes its data position on different data."""
    key = json.dumps([meta["inputs_fingerprint"], meta["settings"],
                      meta["tokenizer"]["fingerprint"]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def open_split(data_dir, split) -> np.memmap:
    """Read-only uint16 memmap of train.bin or val.bin."""
    assert split in SPLITS, split
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=DTYPE, mode="r")


def tokenizer_state(data_dir) -> dict:
    """Everything needed to rebuild the dataset's tokenizer, JSON-able (stored in checkpoints),
    and the template its conversations were rendered with, if it has one (inference renders
    prompts with it)."""
    meta = read_meta(data_dir)
    state = dict(meta["tokenizer"], json=None)
    if meta.get("template"):
        state["template"] = meta["template"]
    if state["kind"] == "bpe":
        path = os.path.join(data_dir, "tokenizer.json")
        try:
            with open(path, "rb") as f:
                state["json"] = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, 'strerror', None) or e
            raise Error(f"{path} is missing or unreadable ({why}) (the dataset is damaged; "
                        f"rebuild it: python prepare.py --force ...)") from None
        if hashlib.sha256(state["json"].encode("utf-8")).hexdigest() != state["fingerprint"]:
            raise Error(f"{path} does not match its fingerprint in meta.json "
                        f"(the dataset is damaged; rebuild it: python prepare.py --force ...)")
    return state

def mixture_fingerprint(datasets) -> str:
    """Identity of a mixture's token streams ([(meta, weight)]): one dataset's own fingerprint, as
    before mixtures existed, or each one's with its weight."""
    if len(datasets) == 1:
        return fingerprint(datasets[0][0])
    key = json.dumps([[fingerprint(meta), weight] for meta, weight in datasets])
    return hashlib.sha256(key.encode()).hexdigest()


def check_fits(state, source, data_dir, tokenizer, data_fingerprint, new_run) -> None:
    """Error unless a checkpoint state fits this dataset: its tokenizer, or for a new run from its
    weights also one that extends it (prepare.py --extend_vocab); and, to continue its run, the
    same data. The error says what differs and what to do."""
    theirs = state["tokenizer"]
    same = theirs["fingerprint"] == tokenizer["fingerprint"]
    if not same and not (new_run and extends(tokenizer, theirs)):
        # gpt2 and byte go by name, a BPE by its tokenizer.json (an hf: folder holds its own)
        kind = theirs["kind"]
        bpe = (os.path.join(source, "tokenizer.json") if os.path.isdir(source)
               else "PATH/tokenizer.json")
        raise Error(f"{source} was trained with a different tokenizer than {data_dir} "
                    f"({kind} {theirs['fingerprint'][:12]} vs {tokenizer['kind']} "
                    f"{tokenizer['fingerprint'][:12]}); prepare the data with the checkpoint's "
                    f"tokenizer (prepare.py --tokenizer={bpe if kind == 'bpe' else kind}, "
                    f"optionally --extend_vocab=N)")
    if not new_run and state["data"]["fingerprint"] != data_fingerprint:
        raise Error(f"{source} was trained on other data than {data_dir} "
                    f"(dataset '{state['data']['dataset']}' changed or differs); "
                    f"to start a new run from its weights on this data add --reset_state=True")

# -----------------------------------------------------------------------------
# the training order: each epoch visits every window once, in an order that is a function of
# (seed, epoch); the position (epoch, index) is global, so any number of ranks agree on it, and a
# checkpoint that holds it resumes with the very next batch. A window is given as its token ranges
# ((start, length), ...): one range of block_size + 1 tokens for plain text, whole examples for
# flagged data, packed anew each epoch (see packed())

@functools.lru_cache(maxsize=8)  # the current epoch's permutation of each dataset of a mixture
def epoch_order(seed, epoch, n_windows, dataset=0) -> np.ndarray:
    key = [seed, epoch, dataset] if dataset else [seed, epoch]  # the first: as before mixtures
    return np.random.default_rng(key).permutation(n_windows)


def next_windows(pos, count, part, seed, dataset=0):
    """The next `count` windows (token ranges) of a mixture's dataset'th dataset, part its
    open_dataset split, from its position pos = (epoch, index), and the position after them."""
    epoch, index = pos
    out = []
    while count:
        if part["flags"] is None:
            n = part["n"]
            take = min(count, n - index)
            T = part["block_size"]
            out += [((int(w) * T, T + 1),)
                    for w in epoch_order(seed, epoch, n, dataset)[index:index + take]]
        else:
            windows = packed(part, epoch, seed, dataset)
            n = len(windows)
            take = min(count, n - index)
            out += windows[index:index + take]
        count, index = count - take, index + take
        if index == n:
            epoch, index = epoch + 1, 0
    return out, (epoch, index)


def fixed_windows(part, ws) -> list:
    """Windows ws of a split as token ranges, in a fixed layout (the evals': the same each time)."""
    if part["flags"] is None:
        T = part["block_size"]
        return [((int(w) * T, T + 1),) for w in ws]
    return [packed(part, None)[w] for w in ws]

# -----------------------------------------------------------------------------
# question/answer records: a record is segments of text, each trained or not; conversations are
# rendered with a template recorded in meta.json, so inference renders a prompt the same way

ROLES = ("system", "user", "assistant")
# role prefixes on their own lines; an assistant turn ends with the end-of-text token (trained)
TEMPLATE = {"system": "System:\n{content}\n", "user": "User:\n{content}\n",
            "assistant": "Assistant:\n{content}"}
KEYS = ("text_key", "prompt_key", "completion_key", "messages_key")  # prepare.py's record fields


def read_template(spec) -> dict:
    """prepare.py's --template: '' for TEMPLATE, else a JSON file or JSON text {role: text with
    {content} once} for each of ROLES; Error when it cannot render."""
    if not spec:
        return dict(TEMPLATE)
    text = files.read_text(spec, "template file") if os.path.isfile(spec) else spec
    try:
        template = json.loads(text)
    except ValueError as e:
        raise Error(f"--template={spec}: neither a JSON file nor JSON text ({e})") from None
    if not isinstance(template, dict) or sorted(template) != sorted(ROLES):
        raise Error(f"--template={spec}: expected an object with exactly the keys "
                    f"{', '.join(ROLES)}")
    for role, part in template.items():
        if not isinstance(part, str) or part.count("{content}") != 1:
            raise Error(f"--template: the {role} part {part!r} must be text holding {{content}} "
                        f"once")
        try:
            part.format(content="")
        except (ValueError, IndexError, KeyError) as e:
            raise Error(f"--template: the {role} part {part!r} cannot render ({e}); a literal "
                        f"brace is written {{{{ or }}}}") from None
    return template


def segments(record, keys, template) -> list:
    """A record's [(text, trained)], text None for the end-of-text token: a conversation
    ({messages_key: [{role, content}, ...]}) rendered with template, the assistant's contents and
    the end-of-text after each trained; a pair ({prompt_key, completion_key}) as prompt then
    completion, the completion trained; a document ({text_key}) all trained. The record's last
    end-of-text is the document's (the caller's). Error(reason) for anything else."""
    if not isinstance(record, dict):
        raise Error(f"expected a JSON object, got {type(record).__name__}")
    text_key, prompt_key, completion_key, messages_key = (keys[k] for k in KEYS)
    if messages_key in record:
        return conversation(record[messages_key], template, f"{messages_key!r}")
    if prompt_key in record or completion_key in record:
        pair = [record.get(prompt_key), record.get(completion_key)]
        for name, value in zip((prompt_key, completion_key), pair):
            check_text(value, f"{name!r}")
        return [(pair[0], False), (pair[1], True)]
    if text_key in record:
        check_text(record[text_key], f"{text_key!r}", empty=True)
        return [(record[text_key], True)] if record[text_key] else []
    raise Error(f"no field {text_key!r} (a document), {prompt_key!r} and {completion_key!r} (a "
                f"pair) or {messages_key!r} (a conversation); the record has "
                f"{', '.join(record) or 'none'} (set --text_key, --prompt_key, --completion_key or "
                f"--messages_key)")


def check_text(value, what, empty=False):
    if not isinstance(value, str):
        raise Error(f"{what} must be a string, got {type(value).__name__}")
    if not value and not empty:
        raise Error(f"{what} is empty")
    if files.not_utf8(value):
        raise Error(f"{what} holds a lone surrogate escape, not text")


def conversation(messages, template, what, answer=True) -> list:
    """A conversation's segments (see segments). answer=False renders a prompt for inference: the
    turns given, then the assistant's prefix (template text before {content}), untrained."""
    if not isinstance(messages, list) or not messages:
        raise Error(f"{what} must be a non-empty list of {{role, content}} turns")
    if answer and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise Error(f"{what} has no assistant turn: nothing in it would train")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise Error(f"{what} turn {k + 1}: role {role!r} is none of {', '.join(ROLES)}")
        check_text(m.get("content"), f"{what} turn {k + 1} content")
        before, after = template[m["role"]].split("{content}")
        if m["role"] != "assistant":
            out.append((before.format() + m["content"] + after.format(), False))
            continue
        out += [(before.format(), False), (m["content"] + after.format(), True)]
        if k < len(messages) - 1:
            out.append((None, True))  # the end of a turn; the last one is the document's
    if answer and messages[-1]["role"] != "assistant":
        raise Error(f"{what}: the last turn is the {messages[-1]['role']}'s; a conversation ends "
                    f"with the assistant's, which is what trains")
    if not answer:
        out.append((template["assistant"].split("{content}")[0].format(), False))
    return [(t, trained) for t, trained in out if t != ""]


def encode_segments(tokenizer, segs) -> tuple:
    """(ids, flags) of segments, each encoded on its own (as prepare.py stores them and as
    inference must encode a prompt: one string could tokenize across a boundary differently)."""
    texts = [t for t, _ in segs if t is not None]
    encoded = iter(tokenizer.encode_batch(texts))
    ids, flags = [], []
    for text, trained in segs:
        a = np.array([tokenizer.eot_id], dtype=DTYPE) if text is None else next(encoded)
        ids.append(a)
        flags.append(np.full(len(a), trained, dtype=np.uint8))
    if not ids:
        return np.zeros(0, DTYPE), np.zeros(0, np.uint8)
    return np.concatenate(ids), np.concatenate(flags)


# -----------------------------------------------------------------------------
# windows of flagged data (question/answer): whole examples packed together, so that no answer is
# trained without its question in context; shuffled and packed anew every epoch, so that no
# answer can be learned from the examples that always came before it in its window

def pack(lengths, block_size) -> list:
    """The windows of examples of these lengths, in this order, each at most block_size + 1
    tokens: (first example, count, offset) each: count whole examples from the first on, or one
    example longer than a window from offset (its windows block_size apart: the later ones see
    the rest of it without its beginning). The rest of a window is padding, never a target."""
    W, ends, out, i = block_size + 1, np.cumsum(lengths), [], 0
    while i < len(lengths):
        if lengths[i] > W:
            out += [(i, 1, o) for o in range(0, int(lengths[i]) - 1, block_size)]
            i += 1
            continue
        j = int(np.searchsorted(ends, ends[i] - lengths[i] + W, side="right"))
        out.append((i, j - i, 0))
        i = j
    return out


def packed(part, epoch, seed=0, dataset=0) -> list:
    """A flagged split's windows as token ranges: its examples shuffled by (seed, epoch, dataset)
    and packed; epoch None: in the file's order (the evals' fixed windows). The last epoch's
    are kept."""
    cache = part["packed"]
    if epoch not in cache:
        starts, lengths, T = part["starts"], part["lengths"], part["block_size"]
        order = np.arange(len(starts))
        if epoch is not None:
            order = np.random.default_rng([seed, epoch, dataset, 1]).permutation(len(starts))
            for e in [e for e in cache if e is not None]:
                del cache[e]
        first, size = starts[order].tolist(), lengths[order].tolist()
        cache[epoch] = [((first[i] + o, min(size[i] - o, T + 1)),) if o or size[i] > T + 1 else
                        tuple(zip(first[i:i + c], size[i:i + c])) for i, c, o in pack(size, T)]
    return cache[epoch]


def parse_mixture(spec) -> list:
    """[(name, weight)] of --dataset: 'name', or 'a:0.8,b:0.2' (weights relative; normalised)."""
    parts = [p.strip() for p in str(spec).split(",")]
    out = []
    for p in parts:
        name, colon, w = p.partition(":")
        try:
            weight = float(w) if colon else 1.0
        except ValueError:
            weight = None
        if not name or weight is None or not math.isfinite(weight) or weight <= 0:
            raise Error(f"dataset={spec!r}: each part is a name or NAME:WEIGHT with a positive "
                        f"weight, e.g. kormed_qa:0.8,stdlib:0.2")
        if name in [n for n, _ in out]:
            raise Error(f"dataset={spec!r} names {name} twice")
        out.append((name, weight))
    total = sum(w for _, w in out)
    return [(n, w / total) for n, w in out]


def mixture_windows(positions, parts, weights, count, seed) -> tuple:
    """The next `count` windows of a mixture [(dataset, token ranges)] of parts (open_dataset's
    train splits), in order, and the positions after them: mixture_order picks each one's
    dataset, next_windows its window in that dataset's epoch."""
    sizes = [p["n"] for p in parts]
    order = mixture_order(positions, sizes, weights, count) if len(sizes) > 1 else [0] * count
    picks, after = [None] * count, list(positions)
    for d, part in enumerate(parts):
        slots = [k for k, o in enumerate(order) if o == d]
        windows, after[d] = next_windows(positions[d], len(slots), part, seed, d)
        for k, w in zip(slots, windows):
            picks[k] = (d, w)
    return picks, after


def model_tokenizer(datasets) -> dict:
    """The tokenizer record a model of datasets (open_dataset's) uses: the one whose ids every
    other's agree with (an extended tokenizer, prepare.py --extend_vocab, agrees with its base's
    ids; the larger is the model's), with the template of their conversations. Error when two
    disagree, or render conversations with different templates."""
    toks = [d["tokenizer"] for d in datasets]
    model = max(toks, key=lambda t: t["vocab_size"])
    for d, tok in zip(datasets, toks):
        if not extends(model, tok):
            first = datasets[toks.index(model)]
            raise Error(f"the tokenizers of {first['name']} and {d['name']} disagree "
                        f"({model['kind']} {model['fingerprint'][:12]} vs {tok['kind']} "
                        f"{tok['fingerprint'][:12]}); prepare them with one tokenizer "
                        f"(--tokenizer=PATH/tokenizer.json, optionally --extend_vocab=N)")
    templates = {json.dumps(t["template"]): d["name"] for d, t in zip(datasets, toks)
                 if "template" in t}
    if len(templates) > 1:
        raise Error(f"{' and '.join(templates.values())} render conversations with different "
                    f"templates (meta.json's 'template'); prepare them with one --template")
    if templates:
        model = dict(model, template=json.loads(next(iter(templates))))
    return model


def mixture_order(positions, sizes, weights, count) -> list:
    """The dataset of each of the next `count` windows of a mixture: the one furthest behind its
    share of all windows taken so far (the first of equals). A function of the positions alone
    ((epoch, index) per dataset, sizes: windows per epoch), so a resumed run continues the order."""
    taken = [e * n + i for (e, i), n in zip(positions, sizes)]
    order = []
    for _ in range(count):
        total = sum(taken) + 1
        d = max(range(len(taken)), key=lambda k: weights[k] * total - taken[k])
        taken[d] += 1
        order.append(d)
    return order


def open_dataset(data_dir, name, block_size, splits=SPLITS) -> dict:
    """What training reads of a prepared dataset: {name, path, meta, tokenizer (with the template
    its conversations were rendered with), and per split: tokens, flags (None: every token
    trains), block_size, n (windows an epoch; flagged data: as the file's order packs them), and
    for flagged data each example's starts and lengths}."""
    path = os.path.join(data_dir, name)
    meta = read_meta(path)
    out = dict(name=name, path=path, meta=meta, tokenizer=tokenizer_state(path))
    for split in splits:
        tokens = open_split(path, split)
        if not meta.get("flagged") and len(tokens) < block_size + 1:  # packed: padded windows
            raise Error(f"{path} {split} split has {len(tokens)} tokens, fewer than "
                        f"block_size+1={block_size + 1}; use a smaller --block_size or a larger "
                        f"corpus")
        part = dict(name=name, tokens=tokens, flags=None, block_size=block_size,
                    n=(len(tokens) - 1) // block_size)
        if meta.get("flagged"):
            part["flags"] = np.memmap(os.path.join(path, f"{split}.mask"), dtype=np.uint8, mode="r")
            starts = np.fromfile(os.path.join(path, f"{split}.idx"), dtype=np.uint64)
            starts = starts.astype(np.int64)
            part.update(starts=starts, lengths=np.diff(starts, append=len(tokens)), packed={})
            part["n"] = len(packed(part, None))  # an epoch's windows, as the file's order packs
        out[split] = part
    return out


def batch(parts, picks, block_size, eot_id, vocab_size, every_token=False) -> tuple:
    """(xy, counted) for windows picks [(dataset, token ranges)] of parts (open_dataset splits): xy
    (B, 2 * block_size) int64, the inputs x then the targets y, a packed window padded with
    end-of-text and y -1 where a target does not count in the loss (not flagged, unless
    every_token; padding never); counted: how many do. Error for a token id past vocab_size."""
    xy = np.full((len(picks), block_size + 1), eot_id, dtype=np.int64)
    trained = np.ones((len(picks), block_size), dtype=bool)
    for r, (d, ranges) in enumerate(picks):
        part = parts[d]
        if part["flags"] is None:
            (a, n), = ranges
            xy[r] = part["tokens"][a:a + n]
            continue
        n = sum(length for _, length in ranges)
        xy[r, :n] = np.concatenate([part["tokens"][a:a + k] for a, k in ranges])
        trained[r] = np.arange(1, block_size + 1) < n
        if not every_token:
            trained[r, :n - 1] &= window_flags(part, ranges)[1:]
    if xy.max() >= vocab_size:  # past the embedding: a traceback on a CPU, an assert on a GPU
        name = parts[picks[int(xy.max(axis=1).argmax())][0]]["name"]
        raise Error(f"{name} holds token id {xy.max()} but the model's vocabulary has {vocab_size} "
                    f"tokens (the dataset is damaged; rebuild it: python prepare.py --force ...)")
    y = xy[:, 1:] if trained.all() else np.where(trained, xy[:, 1:], -1)
    return np.concatenate([xy[:, :-1], y], axis=1), int(trained.sum())


def window_flags(part, ranges) -> np.ndarray:
    return np.concatenate([part["flags"][a:a + k] for a, k in ranges]).astype(bool)


def count_trained(parts, picks, block_size, every_token=False) -> int:
    """The targets of windows picks that count in the loss (as batch() says), read off the flags
    alone: what a training step divides its summed loss by."""
    total = 0
    for d, ranges in picks:
        part = parts[d]
        if part["flags"] is None:
            total += block_size
        elif every_token:
            total += sum(k for _, k in ranges) - 1
        else:
            total += int(window_flags(part, ranges)[1:].sum())
    return total

# -----------------------------------------------------------------------------
# tokenizers

class Tokenizer:
    """encode/decode for one tokenizer kind; build it with load_tokenizer(state)."""

    def __init__(self, state, enc, hf=None):
        self.kind, self.fingerprint = state["kind"], state["fingerprint"]
        self.vocab_size, self.eot_id = state["vocab_size"], state["eot_id"]
        self._enc = enc  # tiktoken Encoding: encodes, and always decodes
        self._hf = hf    # HF tokenizer that encodes instead, when tiktoken can't reproduce it

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text: '<|endoftext|>' inside it is plain text, never the EOT id."""
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """uint16 id arrays, one per text (numpy, so large corpora skip Python int lists)."""
        if self._hf is not None:
            return [np.array(e.ids, dtype=DTYPE) for e in self._hf.encode_batch(texts)]
        # allowed_special is empty, so this is encode_ordinary, straight into a buffer
        return [self._enc.encode_to_numpy(t, disallowed_special=()).astype(DTYPE) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        return self._enc.decode_bytes(np.asarray(ids).tolist())

    def decode(self, ids) -> str:
        # errors="replace": a sampled sequence may end inside a multi-byte character
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def byte_of_char():
    """Invert GPT-2's bytes_to_unicode(): tokenizer.json spells each byte as a printable char."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def parse_bpe(json_text, source):
    """(spec, vocab, byte ranks, eot id, merges) of a byte-level BPE tokenizer.json, or a one-line
    error."""
    try:
        spec = json.loads(json_text)
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        ok = (model.get("type") == "BPE" and spec.get("normalizer") is None
              and not model.get("dropout") and pre.get("type") == "ByteLevel"
              and not pre.get("add_prefix_space") and pre.get("use_regex", True)
              and not model.get("continuing_subword_prefix")
              and not model.get("end_of_word_suffix"))
        eots = [t["id"] for t in spec.get("added_tokens", []) if t["content"] == EOT]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Error(f"{source} is not a tokenizer.json ({type(e).__name__}: {e}) "
                           f"(pass one written by prepare.py)") from None
    if not ok or len(eots) != 1:
        raise Error(f"{source} is not a byte-level BPE tokenizer.json with an {EOT} special token "
                    f"(pass one written by prepare.py, "
                    f"e.g. --tokenizer=data/stdlib/tokenizer.json)")
    byte_of = byte_of_char()
    # GPT-2's json lists it twice
    vocab = {tok: i for tok, i in model["vocab"].items() if tok != EOT}
    ids = set(vocab.values())
    if (not all(c in byte_of for tok in vocab for c in tok) or not set(byte_of) <= set(vocab)
            or len(ids) != len(vocab) or eots[0] in ids):
        raise Error(f"{source}: the vocabulary is not byte-level, lacks some of the 256 byte "
                    f"tokens or repeats ids "
                    f"(pass a byte-level BPE tokenizer.json written by prepare.py)")
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items()}
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return spec, vocab, ranks, eots[0], merges


def make_state(kind: str, json_text: str = None, source: str = "tokenizer.json") -> dict:
    """The tokenizer_state() dict of a new tokenizer: "byte", "gpt2", or "bpe" from tokenizer.json
    text."""
    if kind == "byte":
        return dict(kind="byte", fingerprint="byte", vocab_size=257, eot_id=256, json=None)
    if kind == "gpt2":
        enc = gpt2_encoding()
        return dict(kind="gpt2", fingerprint="gpt2", vocab_size=enc.n_vocab,
                    eot_id=enc.eot_token, json=None)
    assert kind == "bpe", kind
    _, vocab, _, eot_id, _ = parse_bpe(json_text, source)
    vocab_size = max(max(vocab.values()), eot_id) + 1
    if vocab_size > np.iinfo(DTYPE).max:
        raise Error(f"{source} has {vocab_size} tokens; ids must fit uint16 "
                    f"(use a vocabulary of at most 65535)")
    fingerprint = hashlib.sha256(json_text.encode("utf-8")).hexdigest()
    return dict(kind="bpe", fingerprint=fingerprint, vocab_size=vocab_size, eot_id=eot_id,
                json=json_text)


def load_tokenizer(state: dict) -> Tokenizer:
    import tiktoken
    kind = state["kind"]
    if kind == "byte":
        enc = tiktoken.Encoding("byte", pat_str=BYTE_PAT,
                                mergeable_ranks={bytes([b]): b for b in range(256)},
                                special_tokens={EOT: 256})
        return Tokenizer(state, enc)
    if kind == "gpt2":
        enc = gpt2_encoding()
        if (enc.n_vocab, enc.eot_token) != (state["vocab_size"], state["eot_id"]):
            raise Error(f"tiktoken's gpt2 has {enc.n_vocab} tokens, eot {enc.eot_token}; "
                        f"the data expects {state['vocab_size']}, eot {state['eot_id']} "
                        f"(re-run prepare.py --force)")
        return Tokenizer(state, enc)
    if kind != "bpe":
        raise Error(f"unknown tokenizer kind {kind!r} "
                    f"(expected bpe, gpt2 or byte; re-run prepare.py)")
    json_text = state["json"]
    if hashlib.sha256(json_text.encode("utf-8")).hexdigest() != state["fingerprint"]:
        raise Error("tokenizer.json does not match its fingerprint in meta.json "
                    "(re-run prepare.py --force)")
    spec, vocab, ranks, eot_id, merges = parse_bpe(json_text, "tokenizer.json")
    enc = tiktoken.Encoding(f"bpe-{state['fingerprint'][:12]}", pat_str=GPT2_PAT,
                            mergeable_ranks=ranks, special_tokens={EOT: eot_id})
    # tiktoken merges the adjacent pair whose joined bytes have the lowest id, HF the pair listed
    # first in merges: the same only when each merge made a new token and later merges made higher
    # ids (an extended vocabulary's merges continue after the base's EOT id: see extend_bpe)
    made = [vocab.get(a + b, -1) for a, b in merges]
    in_order = len(vocab) == 256 + len(merges) and min(made, default=256) >= 256 and all(
        x < y for x, y in zip(made, made[1:]))
    hf = None
    if not in_order:
        from tokenizers import Tokenizer as HFTokenizer
        spec["added_tokens"] = []  # HF would turn '<|endoftext|>' inside a document into the EOT id
        hf = HFTokenizer.from_str(json.dumps(spec))
    return Tokenizer(state, enc, hf)


def gpt2_encoding():
    import socket
    import tiktoken
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(FETCH_TIMEOUT)  # a blocked network would otherwise hang forever
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        import tempfile
        cache = os.environ.get("TIKTOKEN_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "data-gym-cache"))
        raise Error(f"tiktoken could not load the gpt2 encoding: no cached copy in {cache} "
                    f"and the download failed ({type(e).__name__}) "
                    f"(on a machine with network run TIKTOKEN_CACHE_DIR=DIR python -c "
                    f"\"import tiktoken; tiktoken.get_encoding('gpt2')\", "
                    f"copy DIR here and set TIKTOKEN_CACHE_DIR to it)") from None
    finally:
        socket.setdefaulttimeout(old)


def train_bpe(texts, vocab_size: int, show_progress=False) -> str:
    """Train a byte-level BPE on an iterator of texts; returns the tokenizer.json text.
    The EOT special token is added last, so its id is vocab_size - 1 (fewer on a tiny corpus)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)  # consumes the iterator lazily: bounded memory
    tok.add_special_tokens([EOT])
    return tok.to_str()


def extend_bpe(json_text: str, texts, n_merges: int, source: str = "tokenizer.json") -> str:
    """The byte-level BPE tokenizer.json json_text with up to n_merges more merges learned on an
    iterator of texts (fewer if the words run out of pairs); returns the new tokenizer.json text.
    Every base token keeps its id, EOT included, and the new tokens take the next ids in merge
    order, so a base model's embedding rows keep their meaning. This is BPE training continued from
    the base's merges: words are counted with the GPT-2 regex (memory grows with distinct words,
    not with text), each is split into base tokens by the base tokenizer, then the most frequent
    adjacent pair (ties: lowest ids) is merged in every word, n_merges times."""
    import heapq
    from collections import Counter, defaultdict
    import regex
    spec, vocab, _, _, _ = parse_bpe(json_text, source)
    state = make_state("bpe", json_text, source)
    counts = Counter()
    pat = regex.compile(GPT2_PAT)
    for text in texts:
        counts.update(pat.findall(text))
    words = [a.tolist() for a in load_tokenizer(state).encode_batch(list(counts))]
    freqs = list(counts.values())
    # pair -> occurrences; pair -> indices of words holding it
    pairs, where = Counter(), defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pairs[p] += f
            where[p].add(i)
    # a max-heap of counts, updated lazily: stale entries are skipped when their count no longer
    # matches
    heap = [(-n, p) for p, n in pairs.items()]
    heapq.heapify(heap)
    string = {i: s for s, i in vocab.items()}
    new_id, new_merges = state["vocab_size"], []
    while len(new_merges) < n_merges and heap:
        n, p = heapq.heappop(heap)
        joined = string[p[0]] + string[p[1]]
        if -n != pairs[p] or joined in vocab:  # stale, or already a token (made from another split)
            continue
        vocab[joined], string[new_id] = new_id, joined
        new_merges.append([string[p[0]], string[p[1]]])
        changed = set()
        for i in where.pop(p):
            w, merged, j = words[i], [], 0
            while j < len(w):  # replace every occurrence of p, left to right, as BPE encoding does
                if j + 1 < len(w) and (w[j], w[j + 1]) == p:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            for q in zip(w, w[1:]):
                pairs[q] -= freqs[i]
                changed.add(q)
            for q in zip(merged, merged[1:]):
                pairs[q] += freqs[i]
                changed.add(q)
                if new_id in q:  # the word's other pairs were there before: where has it already
                    where[q].add(i)
            words[i] = merged
        for q in changed:
            if pairs[q] > 0:
                heapq.heappush(heap, (-pairs[q], q))
        new_id += 1
    model = spec["model"]
    # older HF: "a b", newer: [a, b]
    as_text = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"] += [" ".join(m) if as_text else m for m in new_merges]
    model["vocab"].update({a + b: vocab[a + b] for a, b in new_merges})
    return json.dumps(spec, ensure_ascii=False)


def extends(new: dict, old: dict) -> bool:
    """Whether tokenizer state `new` is `old` itself or old extended (prepare.py --extend_vocab):
    every token of old keeps its id (EOT too) and new only appends merges, so ids mean the same.
    Checked on the tokenizers themselves, not on meta.json's record of the base."""
    if new["fingerprint"] == old["fingerprint"]:
        return True
    if new["kind"] != "bpe" or old["kind"] != "bpe":
        return False
    (new_spec, new_vocab, _, new_eot, new_merges), (old_spec, old_vocab, _, old_eot, old_merges) = (
        parse_bpe(s["json"], f"the {name} tokenizer") for s, name in ((new, "new"), (old, "old")))
    for spec in (new_spec, old_spec):  # everything else (pre-tokenizer, decoder, ...) must be equal
        spec["model"] = {k: v for k, v in spec["model"].items() if k not in ("vocab", "merges")}
    return (new_spec == old_spec and new_eot == old_eot and old_vocab.items() <= new_vocab.items()
            and [list(m) for m in new_merges[:len(old_merges)]] == [list(m) for m in old_merges])

# -----------------------------------------------------------------------------
# writing

def publish(tmp_dir, out_dir, meta):
    """Turn the finished tmp_dir into out_dir with meta.json written last: a crash at any point
    leaves either the old complete dataset or the new one, never a mix."""
    with open(os.path.join(tmp_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    files.publish_dir(tmp_dir, out_dir)
