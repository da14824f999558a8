"""
Measuring a model: what evaluate.py prints and what train.py logs at each eval.

    perplexity(model, tokens, tokenizer, stride)      loss, perplexity and bits per byte of a token stream
    generate_samples(model, tokenizer, prompts, ...)  seeded samples, num_samples per prompt in one batch
    generation_metrics(samples)                       distinct-1..4, repetition rate, Python validity
    load_mcq(path), score_mcq(model, tokenizer, items) multiple choice, acc / acc_norm as lm-evaluation-harness
    training_metrics(...)                             the numbers train.py's eval_mcq / eval_generate log
    plot_log(log_path, png_path)                      training curves from log.jsonl (needs matplotlib)

Bad input raises EvalError, whose text names the file and line. README.md ("Evaluating a model")
defines every number.
"""
import ast
import json
import keyword
import math
import re
import string
import warnings

import numpy as np
import torch

DEFAULT_PROMPTS = ['def add(a, b):', 'class DataLoader:', 'import numpy as np']
UNIT = re.compile(r'\w+|[^\w\s]|\n')  # the units of distinct-n and repetition: words, symbols, line ends
KEYWORDS = set(keyword.kwlist)
TRAINING_KEYS = ('mcq_acc', 'mcq_acc_norm', 'repetition', 'distinct_1', 'distinct_2', 'distinct_3',
                 'distinct_4', 'code_parses', 'code_keywords')  # what training_metrics() returns


class EvalError(Exception):
    """str() is a one-line reason naming the file (and line), fit to print as is."""


def read_text(path) -> str:
    """A file's UTF-8 text, or EvalError naming the line of the first bad byte."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise EvalError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8") from None


def _nll(model, x, y):
    """Negative log-likelihood (B, T) of targets y after inputs x, 0 where y is -1 (not scored). The
    vocabulary projection runs only at scored positions and without the padding columns (pad_vocab),
    in row chunks: 64 rows of logits stay in a CPU's cache (2x faster than log_softmax over 2048 rows,
    see model.CrossEntropy), 4096 on a GPU, and memory stays bounded with GPT-2's 50k vocabulary."""
    h = model.hidden_states(x)
    mask = y >= 0
    V, rows = model.config.vocab_size, 64 if x.device.type == 'cpu' else 4096
    nll = []
    for hc, yc in zip(h[mask].split(rows), y[mask].split(rows)):
        logits = model.lm_head(hc)[:, :V].float()
        nll.append(torch.logsumexp(logits, dim=-1) - logits.gather(1, yc[:, None])[:, 0])
    out = torch.zeros(y.shape, device=y.device)
    if nll:
        out[mask] = torch.cat(nll)
    return out


# -----------------------------------------------------------------------------
# perplexity and bits per byte

def encode_docs(tokenizer, texts) -> np.ndarray:
    """Documents as prepare.py stores them: each one's tokens followed by the end-of-text token."""
    parts = [np.append(ids.astype(np.int64), tokenizer.eot_id) for ids in tokenizer.encode_batch(list(texts))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def perplexity(model, tokens, tokenizer, stride=None, batch_size=16, device='cpu') -> dict:
    """Loss on every token of `tokens` (documents each followed by end-of-text, as encode_docs and
    prepare.py make them); the first is predicted from an end-of-text token, as a document start is
    in training. Windows of block_size tokens start `stride` apart (None: block_size, so they do not
    overlap); each scores only the tokens no earlier window scored, so with a stride S < block_size
    every token after the first window has at least block_size - S tokens of context.
    bits_per_byte: the total loss in bits over the UTF-8 bytes of the text (end-of-text excluded)."""
    T = model.config.block_size
    S = stride or T
    if S > T:
        raise EvalError(f"stride {S} is larger than the checkpoint's block_size {T}: tokens would be skipped")
    seq = np.concatenate([[tokenizer.eot_id], np.asarray(tokens, dtype=np.int64)])
    N = len(seq) - 1  # targets seq[1..N]
    text_ids = seq[1:][seq[1:] != tokenizer.eot_id]
    n_bytes = sum(len(tokenizer.decode_bytes(c)) for c in np.split(text_ids, range(1 << 20, len(text_ids), 1 << 20)))
    if not n_bytes:
        raise EvalError("no text to score (the text or split is empty)")
    windows, prev = [], 0  # (first input, end, first scored target), in target indices
    for begin in range(0, N, S):
        end = min(begin + T, N)
        windows.append((begin, end, prev))
        prev = end
        if end == N:
            break
    total = 0.0
    for k in range(0, len(windows), batch_size):
        group = windows[k:k + batch_size]
        x = torch.zeros(len(group), max(e - b for b, e, _ in group), dtype=torch.long)
        y = torch.full_like(x, -1)  # right padding: causal attention keeps it out of scored positions
        for r, (b, e, first) in enumerate(group):
            x[r, :e - b] = torch.from_numpy(seq[b:e])
            y[r, first - b:e - b] = torch.from_numpy(seq[first + 1:e + 1])
        total += _nll(model, x.to(device), y.to(device)).double().sum().item()
    loss = total / N
    return dict(loss=loss, ppl=math.exp(min(loss, 700)), bits_per_byte=total / math.log(2) / n_bytes,
                tokens=N, bytes=n_bytes, windows=len(windows), block_size=T, stride=S)

# -----------------------------------------------------------------------------
# generation

def load_prompts(path=None) -> list:
    """One prompt per line of a UTF-8 file (blank lines skipped); a line in double quotes is a JSON
    string, so it may hold newlines ("def f(x):\\n    "). None: DEFAULT_PROMPTS."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = []
    for n, line in enumerate(read_text(path).split('\n'), 1):
        line = line.rstrip('\r')
        if line.startswith('"'):
            try:
                line = json.loads(line)
            except ValueError as e:
                raise EvalError(f"{path}, line {n}: a line starting with a quote must be a JSON string ({e})") from None
        if line.strip():
            prompts.append(line)
    if not prompts:
        raise EvalError(f"{path} holds no prompts (one per line)")
    return prompts


@torch.inference_mode()
def generate_samples(model, tokenizer, prompts, num_samples=5, max_new_tokens=200, temperature=0.8,
                     top_k=None, top_p=0.95, seed=1337, device='cpu') -> list:
    """num_samples continuations of each prompt, drawn as one batch from a generator seeded with
    seed + the prompt's index (a prompt's samples do not depend on the prompts before it), each cut
    at its first end-of-text token. Returns dicts {prompt, text (the continuation), cut_off (True:
    it ran to max_new_tokens without ending)}."""
    samples, eot = [], tokenizer.eot_id
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)[-model.config.block_size:] or [eot]
        x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(seed + i)
        out = model.generate(x, max_new_tokens, temperature, top_k, top_p, generator=gen)
        for row in out[:, len(ids):].tolist():
            end = row.index(eot) if eot in row else len(row)
            samples.append(dict(prompt=prompt, text=tokenizer.decode(row[:end]), cut_off=eot not in row))
    return samples


def distinct(units_per_sample, n) -> float:
    """distinct-n (Li et al., 2016): distinct n-grams over all n-grams, pooled over the samples."""
    grams = [tuple(u[i:i + n]) for u in units_per_sample for i in range(len(u) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeats(units, copies=3, share=0.5) -> bool:
    """True when the sample ends in a loop: its last units are one n-gram (of any length) repeated
    back to back at least `copies` times, and the repetition covers at least `share` of its units."""
    N = len(units)
    for p in range(1, N // copies + 1):
        k = 0  # units at the end that equal the unit p before them
        while k < N - p and units[N - 1 - k] == units[N - 1 - k - p]:
            k += 1
        if k + p >= max(copies * p, share * N):
            return True
    return False


def code_parses(code, cut_off=False, keep_lines=1) -> bool:
    """True when `code` parses as Python (ast). A cut-off sample may end mid-line or mid-statement:
    then its last lines are dropped one at a time, back to (and including) the start of its last
    top-level statement, and it passes if one of those prefixes parses. The first keep_lines lines
    (the prompt's and the first generated one) are never dropped, so a sample cannot pass on its
    prompt alone."""
    lines = code.split('\n')
    last = max([i for i, line in enumerate(lines) if line[:1].strip() and line[0] not in '#)]}'], default=0)
    stop = max(last, keep_lines) if cut_off else len(lines)
    for k in range(len(lines), stop - 1, -1):
        try:
            with warnings.catch_warnings():  # invalid escapes in generated strings warn, not fail
                warnings.simplefilter('ignore')
                ast.parse('\n'.join(lines[:k]))
            return True
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            pass
    return False


def generation_metrics(samples, code=True) -> dict:
    """distinct_1..4 and repetition (the share of samples that repeats() flags) over the samples'
    units (UNIT: words, single symbols and line ends, so tokenizers do not matter); with code, the
    share of samples (prompt + continuation) that code_parses() and the share whose continuation
    uses a Python keyword as a word."""
    units = [UNIT.findall(s['text']) for s in samples]
    out = {f'distinct_{n}': distinct(units, n) for n in (1, 2, 3, 4)}
    out['repetition'] = float(np.mean([repeats(u) for u in units]))
    if code:
        out['code_parses'] = float(np.mean([code_parses(s['prompt'] + s['text'], s['cut_off'],
                                                        s['prompt'].count('\n') + 2) for s in samples]))
        out['code_keywords'] = float(np.mean([bool(KEYWORDS & set(re.findall(r'\w+', s['text']))) for s in samples]))
    return out

# -----------------------------------------------------------------------------
# multiple choice

def _mcq_item(obj, where):
    """{question, choices, answer (0-based)} from one JSONL record in either format."""
    if not isinstance(obj, dict) or not isinstance(obj.get('question'), str):
        raise EvalError(f'{where}: expected a JSON object with a "question" string')
    letters = string.ascii_uppercase
    if 'choices' in obj:  # MMLU exports: "choices": [...], answer 0-based or a letter
        choices, base = obj['choices'], 0
        if not isinstance(choices, list):
            raise EvalError(f'{where}: "choices" must be a list')
    else:  # KorMedMCQA: "A", "B", ... answer 1-based or a letter
        n = 0
        while n < len(letters) and letters[n] in obj:
            n += 1
        choices, base = [obj[c] for c in letters[:n]], 1
    if len(choices) < 2:
        raise EvalError(f'{where}: {len(choices)} choice(s), at least 2 are needed '
                        f'("choices": [...] or "A", "B", ...)')
    for i, c in enumerate(choices):
        if not isinstance(c, (str, int, float)) or isinstance(c, bool) or not str(c).strip():
            raise EvalError(f'{where}: choice {letters[i]} must be non-empty text, got {c!r}')
    answer = obj.get('answer')
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in letters:
        index = letters.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer - base
    else:
        raise EvalError(f'{where}: "answer" must be a letter or a {base}-based index, got {answer!r}')
    if not 0 <= index < len(choices):
        raise EvalError(f'{where}: answer {obj.get("answer")!r} is out of range for {len(choices)} choices '
                        f'({"0-based with a choices list" if base == 0 else "1-based with A, B, ..."})')
    return dict(question=obj['question'], choices=[str(c) for c in choices], answer=index)


def load_mcq(path) -> list:
    """The items of a JSONL exam, one per line: {"question", "choices": [...], "answer": 0-based index
    or letter} (MMLU exports) or {"question", "A", "B", ..., "answer": 1-based index or letter}
    (KorMedMCQA); blank lines are skipped."""
    items = []
    for n, line in enumerate(read_text(path).split('\n'), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{path}, line {n}: not valid JSON ({e})") from None
        items.append(_mcq_item(obj, f"{path}, line {n}"))
    if not items:
        raise EvalError(f"{path} holds no questions (one JSON object per line)")
    return items


def mcq_context(item, shots=()) -> str:
    """lm-evaluation-harness's multiple-choice prompt: each solved example 'Question: ...\\nAnswer:
    <right choice>' followed by a blank line, then 'Question: ...\\nAnswer:'."""
    solved = ''.join(f"Question: {s['question']}\nAnswer: {s['choices'][s['answer']]}\n\n" for s in shots)
    return f"{solved}Question: {item['question']}\nAnswer:"


@torch.inference_mode()
def score_mcq(model, tokenizer, items, shots=(), batch_size=32, device='cpu') -> dict:
    """acc and acc_norm as lm-evaluation-harness defines them for multiple_choice tasks: every choice
    is scored by the log-likelihood of ' ' + choice after mcq_context(item); acc takes the highest,
    acc_norm the highest divided by len(choice) in characters (the space not counted). Prompt and
    choice tokens split as in the harness: the prompt is encoded alone and with the choice, and the
    choice's tokens are those after the prompt's count; too long a row loses tokens on the left.
    Each (item, choice) is one row; rows go longest first, batch_size to a forward, right-padded."""
    T = model.config.block_size
    rows = []  # (tokens, number of scored tokens at the end)
    for item in items:
        context = mcq_context(item, shots)
        ctx_ids = tokenizer.encode(context)
        for choice in item['choices']:
            cont = tokenizer.encode(context + ' ' + choice)[len(ctx_ids):]
            seq = (ctx_ids + cont)[-(T + 1):]
            rows.append((seq, min(len(cont), len(seq) - 1)))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    ll = np.zeros(len(rows))
    for k in range(0, len(order), batch_size):
        group = order[k:k + batch_size]
        x = torch.zeros(len(group), len(rows[group[0]][0]) - 1, dtype=torch.long)
        y = torch.full_like(x, -1)
        for r, i in enumerate(group):
            seq, n = rows[i]
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, len(seq) - 1 - n:len(seq) - 1] = torch.tensor(seq[len(seq) - n:])
        ll[group] = -_nll(model, x.to(device), y.to(device)).double().sum(1).cpu().numpy()
    acc, acc_norm, per_item, start = [], [], [], 0
    for item in items:
        lls = ll[start:start + len(item['choices'])]
        start += len(lls)
        acc.append(np.argmax(lls) == item['answer'])  # argmax: the first of equal scores, as the harness
        acc_norm.append(np.argmax(lls / np.array([len(c) for c in item['choices']])) == item['answer'])
        per_item.append(lls.tolist())
    return dict(acc=float(np.mean(acc)), acc_norm=float(np.mean(acc_norm)), correct=int(np.sum(acc)),
                items=len(items), chance=float(np.mean([1 / len(it['choices']) for it in items])),
                loglikelihoods=per_item)


def training_metrics(model, tokenizer, mcq_items=None, prompts=None, seed=1337, device='cpu') -> dict:
    """What train.py logs with eval_mcq / eval_generate (TRAINING_KEYS): the exam's acc and acc_norm,
    and the generation metrics of evaluate.py's default settings. Call with the model in eval mode."""
    out = {}
    if mcq_items:
        mcq = score_mcq(model, tokenizer, mcq_items, device=device)
        out.update(mcq_acc=mcq['acc'], mcq_acc_norm=mcq['acc_norm'])
    if prompts:
        out.update(generation_metrics(generate_samples(model, tokenizer, prompts, seed=seed, device=device)))
    return out

# -----------------------------------------------------------------------------
# training curves

def read_log(path) -> list:
    """The entries of train.py's log.jsonl."""
    entries = []
    for n, line in enumerate(read_text(path).split('\n'), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:
                raise EvalError(f"{path}, line {n}: not valid JSON (a torn last line? remove it)") from None
    return entries


def plot_log(log_path, png_path) -> None:
    """Train and val loss, learning rate and tokens/s against iterations from train.py's log.jsonl
    (and eval_mcq / eval_generate's numbers when it has them) into a PNG. A resumed run appends to
    the same log; an iteration logged twice (re-run after a kill) shows its later entry."""
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("--plot needs matplotlib: pip install matplotlib") from None
    train, evals = {}, {}
    for e in read_log(log_path):
        if 'loss' in e:
            train[e['step']] = e
        elif 'val_loss' in e:
            evals[e['step']] = e
    if not train and not evals:
        raise EvalError(f"{log_path} holds no training entries yet")
    extra = [k for k in TRAINING_KEYS if any(k in e for e in evals.values())]
    fig, axes = plt.subplots(3 + bool(extra), 1, figsize=(10, 10 + 3 * bool(extra)), sharex=True)

    def series(d, key):
        steps = sorted(s for s in d if d[s].get(key) is not None)
        return steps, [d[s][key] for s in steps]
    axes[0].plot(*series(train, 'loss'), label='train loss (per log interval)', color='tab:blue', alpha=0.7)
    axes[0].plot(*series(evals, 'train_loss'), 'o-', label='train loss (eval)', color='tab:cyan', ms=4)
    axes[0].plot(*series(evals, 'val_loss'), 'o-', label='val loss (eval)', color='tab:orange', ms=4)
    axes[0].set_ylabel('loss (nats / token)')
    axes[1].plot(*series(train, 'lr'), color='tab:green')
    axes[1].set_ylabel('learning rate')
    axes[1].ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    axes[2].plot(*series(train, 'tokens_per_sec'), color='tab:purple')
    axes[2].set_ylabel('tokens / s')
    for key in extra:
        axes[3].plot(*series(evals, key), 'o-', label=key, ms=4)
    if extra:
        axes[3].set_ylabel('share (0 to 1)')
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=9)  # beside the curves, not on them
    axes[0].set_title(f"training curves of {log_path}")
    axes[-1].set_xlabel('iteration')
    fig.tight_layout()
    fig.savefig(png_path, dpi=100, bbox_inches='tight')
    plt.close(fig)
