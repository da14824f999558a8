"""
Measuring a model: what evaluate.py prints and what train.py logs at each eval.

    perplexity(model, tokens, tokenizer, stride)      loss, perplexity and bits per byte of tokens
    generate_samples(model, tokenizer, prompts, ...)  seeded samples, num_samples per prompt at once
    generation_metrics(samples)                       distinct-1..4, repetition, Python validity
    load_mcq(path), score_mcq(model, tokenizer, items) MCQ acc / acc_norm as lm-evaluation-harness
    load_qa(path), score_qa(model, tokenizer, items)   answer loss, greedy exact match (harness's)
    training_metrics(...)                             what train.py's eval_mcq / eval_generate log
    plot_log(log_path, png_path)                      log.jsonl's training curves (needs matplotlib)

Bad input raises an Error, whose text names the file and line. The loops take progress=True for a
progress bar on a terminal (evaluate.py); by default they are silent (train.py). README.md
("Evaluating a model") and docs/evaluation.md define every number.
"""
import ast
import json
import keyword
import math
import os
import re
import string
import sys
import warnings

import numpy as np
import torch
from tqdm import tqdm

import dataset as ds
from errors import Error
from files import not_utf8, read_jsonl, read_text

DEFAULT_PROMPTS = ['def add(a, b):', 'class DataLoader:', 'import numpy as np']
# the units of distinct-n and repetition: words, symbols, line ends
UNIT = re.compile(r'\w+|[^\w\s]|\n')
KEYWORDS = set(keyword.kwlist)
TRAINING_KEYS = ('mcq_acc', 'mcq_acc_norm', 'repetition', 'distinct_1', 'distinct_2', 'distinct_3',
                 'distinct_4', 'code_parses', 'code_keywords')  # what training_metrics() returns
MCQ_TEMPLATE = 'Question: {question}\nAnswer:'  # lm-evaluation-harness's MMLU-style doc_to_text
MCQ_DELIMITER = ' '  # the harness's target_delimiter, between the prompt and each choice


def progress_bar(show, total, desc, unit):
    """tqdm's bar (count, rate, ETA) on stderr, when show is true and stderr is a terminal:
    disable=None turns it off for a file or a pipe, where a log wants evaluate.py's one line per
    finished stage, not redraws joined by carriage returns. leave=False: that line replaces the
    finished bar."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None if show else True,
                file=sys.stderr, dynamic_ncols=True)


def _nll(model, x, y):
    """Negative log-likelihood (B, T) of targets y after inputs x, 0 where y is -1 (not scored). The
    vocabulary projection runs only at scored positions and without the padding columns (pad_vocab),
    in row chunks: 64 rows of logits stay in a CPU's cache (2x faster than log_softmax over 2048
    rows, see model.CrossEntropy), 4096 on a GPU, and memory stays bounded with GPT-2's 50k
    vocabulary."""
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


def rows_nll(model, rows, batch_size, device, bar) -> np.ndarray:
    """The summed negative log-likelihood of each row's last n tokens, rows [(token ids, n)]:
    longest first, batch_size rows to a forward, right-padded (bar: a progress bar, closed)."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    nll = np.zeros(len(rows))
    with bar:
        for k in range(0, len(order), batch_size):
            group = order[k:k + batch_size]
            x = torch.zeros(len(group), len(rows[group[0]][0]) - 1, dtype=torch.long)
            y = torch.full_like(x, -1)
            for r, i in enumerate(group):
                seq, n = rows[i]
                x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
                y[r, len(seq) - 1 - n:len(seq) - 1] = torch.tensor(seq[len(seq) - n:])
            nll[group] = _nll(model, x.to(device), y.to(device)).double().sum(1).cpu().numpy()
            bar.update(len(group))
    return nll

# -----------------------------------------------------------------------------
# perplexity and bits per byte

def encode_docs(tokenizer, texts) -> np.ndarray:
    """Documents as prepare.py stores them: each one's tokens followed by the end-of-text token."""
    parts = [np.append(ids.astype(np.int64), tokenizer.eot_id)
             for ids in tokenizer.encode_batch(list(texts))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def perplexity(model, tokens, tokenizer, stride=None, batch_size=16, device='cpu',
               progress=False) -> dict:
    """Loss on every token of `tokens` (documents each followed by end-of-text, as encode_docs and
    prepare.py make them); the first is predicted from an end-of-text token, as a document start is
    in training. Windows of block_size tokens start `stride` apart (None: block_size, so they do not
    overlap); each scores only the tokens no earlier window scored, so with a stride S < block_size
    every token after the first window has at least block_size - S tokens of context.
    bits_per_byte: the total loss in bits over the UTF-8 bytes of the text (end-of-text
    excluded)."""
    T = model.config.block_size
    S = stride or T
    if S > T:
        raise Error(f"stride {S} is larger than the checkpoint's block_size {T}: "
                    f"tokens would be skipped")
    seq = np.concatenate([[tokenizer.eot_id], np.asarray(tokens, dtype=np.int64)])
    N = len(seq) - 1  # targets seq[1..N]
    text_ids = seq[1:][seq[1:] != tokenizer.eot_id]
    chunks = np.split(text_ids, range(1 << 20, len(text_ids), 1 << 20))
    n_bytes = sum(len(tokenizer.decode_bytes(c)) for c in chunks)
    if not n_bytes:
        raise Error("no text to score (the text or split is empty)")
    windows, prev = [], 0  # (first input, end, first scored target), in target indices
    for begin in range(0, N, S):
        end = min(begin + T, N)
        windows.append((begin, end, prev))
        prev = end
        if end == N:
            break
    total = 0.0
    with progress_bar(progress, len(windows), 'perplexity', 'window') as bar:
        for k in range(0, len(windows), batch_size):
            group = windows[k:k + batch_size]
            x = torch.zeros(len(group), max(e - b for b, e, _ in group), dtype=torch.long)
            # right padding: causal attention keeps it out of scored positions
            y = torch.full_like(x, -1)
            for r, (b, e, first) in enumerate(group):
                x[r, :e - b] = torch.from_numpy(seq[b:e])
                y[r, first - b:e - b] = torch.from_numpy(seq[first + 1:e + 1])
            total += _nll(model, x.to(device), y.to(device)).double().sum().item()
            bar.update(len(group))
    loss = total / N
    return dict(loss=loss, ppl=math.exp(min(loss, 700)),
                bits_per_byte=total / math.log(2) / n_bytes,
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
                raise Error(f"{path}, line {n}: a line starting with a quote must be "
                            f"a JSON string ({e})") from None
            if not isinstance(line, str) or not_utf8(line):  # "\ud800": JSON, but no text
                raise Error(f"{path}, line {n}: a line starting with a quote must be "
                            f"a JSON string of text")
        if line.strip():
            prompts.append(line)
    if not prompts:
        raise Error(f"{path} holds no prompts (one per line)")
    return prompts


@torch.inference_mode()
def generate_samples(model, tokenizer, prompts, num_samples=5, max_new_tokens=200, temperature=0.8,
                     top_k=None, top_p=0.95, seed=1337, device='cpu', progress=False) -> list:
    """num_samples continuations of each prompt, drawn as one batch from a generator seeded with
    seed + the prompt's index (a prompt's samples do not depend on the prompts before it), each cut
    at its first end-of-text token. Returns dicts {prompt, text (the continuation), cut_off (True:
    it ran to max_new_tokens without ending)}."""
    samples, eot = [], tokenizer.eot_id
    with progress_bar(progress, len(prompts) * max_new_tokens, 'generation', 'step') as bar:
        for i, prompt in enumerate(prompts):
            ids = tokenizer.encode(prompt)[-model.config.block_size:] or [eot]
            x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
            gen = torch.Generator(device=device).manual_seed(seed + i)
            new = []  # model.generate, a step at a time for the progress bar: the same tokens
            for step in model.generate_stream(x, max_new_tokens, temperature, top_k, top_p,
                                              generator=gen):
                new.append(step)
                bar.update(1)
            for row in torch.cat([x] + new, dim=1)[:, len(ids):].tolist():
                end = row.index(eot) if eot in row else len(row)
                samples.append(dict(prompt=prompt, text=tokenizer.decode(row[:end]),
                                    cut_off=eot not in row))
    return samples


def distinct(units_per_sample, n) -> float:
    """distinct-n (Li et al., 2016): distinct n-grams over all n-grams, pooled over the samples."""
    grams = [tuple(u[i:i + n]) for u in units_per_sample for i in range(len(u) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeats(units, copies=3, share=0.5) -> bool:
    """True when the sample ends in a loop: its last units are one n-gram (of any length) repeated
    back to back at least `copies` times, and the repetition covers at least `share` of its
    units."""
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
    last = max([i for i, line in enumerate(lines)
                if line[:1].strip() and line[0] not in '#)]}'], default=0)
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
        parses = [code_parses(s['prompt'] + s['text'], s['cut_off'], s['prompt'].count('\n') + 2)
                  for s in samples]
        out['code_parses'] = float(np.mean(parses))
        keywords = [bool(KEYWORDS & set(re.findall(r'\w+', s['text']))) for s in samples]
        out['code_keywords'] = float(np.mean(keywords))
    return out

# -----------------------------------------------------------------------------
# multiple choice

def template_fields(template) -> set:
    """The item fields an mcq_template names ('{question}', '{choices[0]}': question, choices), or
    Error when it is not a format string of named fields."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise Error(f"mcq_template {template!r} is not a format string ({e}); fields are written "
                        f"{{question}}, a literal brace {{{{ or }}}}") from None
    fields = {re.match(r'[^.\[]*', name).group() for name in names}
    if not fields or any(f == '' or f.isdigit() for f in fields):
        raise Error(f"mcq_template {template!r} must name the item's fields, "
                    f"e.g. '{{question}}' or 'Question: {{question}}\\nAnswer:'")
    return fields


def fill(template, item, where='an item') -> str:
    """template.format(**item), or Error saying which field `where` lacks."""
    try:
        return template.format(**item)
    except KeyError as e:
        raise Error(f"{where}: mcq_template {template!r} names the field {e.args[0]!r}, "
                    f"which this item lacks (it has {', '.join(item)})") from None
    except (IndexError, AttributeError, ValueError, TypeError) as e:
        raise Error(f"{where}: mcq_template {template!r} does not fit this item "
                    f"({type(e).__name__}: {e})") from None


def _mcq_item(obj, where, template=MCQ_TEMPLATE):
    """{question, choices, answer (0-based)} from one JSONL record in either format, plus the
    record's other fields that the template names (checked here, so a bad template fails before
    any model)."""
    if not isinstance(obj, dict) or not isinstance(obj.get('question'), str):
        raise Error(f'{where}: expected a JSON object with a "question" string')
    letters = string.ascii_uppercase
    if 'choices' in obj:  # MMLU exports: "choices": [...], answer 0-based or a letter
        choices, base = obj['choices'], 0
        if not isinstance(choices, list):
            raise Error(f'{where}: "choices" must be a list')
    else:  # KorMedMCQA: "A", "B", ... answer 1-based or a letter
        n = 0
        while n < len(letters) and letters[n] in obj:
            n += 1
        choices, base = [obj[c] for c in letters[:n]], 1
    if len(choices) < 2:
        raise Error(f'{where}: {len(choices)} choice(s), at least 2 are needed '
                        f'("choices": [...] or "A", "B", ...)')
    for i, c in enumerate(choices):
        if not isinstance(c, (str, int, float)) or isinstance(c, bool) or not str(c).strip():
            raise Error(f'{where}: choice {letters[i]} must be non-empty text, got {c!r}')
    answer = obj.get('answer')
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in letters:
        index = letters.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer - base
    else:
        raise Error(f'{where}: "answer" must be a letter or a {base}-based index, got {answer!r}')
    if not 0 <= index < len(choices):
        convention = "0-based with a choices list" if base == 0 else "1-based with A, B, ..."
        raise Error(f'{where}: answer {obj.get("answer")!r} is out of range for '
                    f'{len(choices)} choices ({convention})')
    item = dict(question=obj['question'], choices=[str(c) for c in choices], answer=index)
    item.update({f: obj[f] for f in template_fields(template) if f not in item and f in obj})
    # names a field the record lacks, or does not fit it: say so now
    fill(template, {**obj, **item}, where)
    return item


def load_mcq(path, template=MCQ_TEMPLATE) -> list:
    """The items of a JSONL exam, one per line: {"question", "choices": [...], "answer": 0-based
    index or letter} (MMLU exports) or {"question", "A", "B", ..., "answer": 1-based index or
    letter} (KorMedMCQA); blank lines are skipped. Each item also keeps the record's fields that
    template (an mcq_template) names, and Error says which line lacks one."""
    items = []
    for n, obj in read_jsonl(path):
        if not_utf8(json.dumps(obj, ensure_ascii=False)):
            raise Error(f"{path}, line {n}: an escape like \"\\ud800\" stands for no text "
                        f"(a lone surrogate)")
        items.append(_mcq_item(obj, f"{path}, line {n}", template))
    if not items:
        raise Error(f"{path} holds no questions (one JSON object per line)")
    return items


def mcq_context(item, shots=(), template=MCQ_TEMPLATE, delimiter=MCQ_DELIMITER) -> str:
    """lm-evaluation-harness's multiple-choice prompt: each solved example as template (its
    doc_to_text) + delimiter (target_delimiter) + its right choice, followed by a blank line (the
    fewshot_delimiter), then the item as template. The default gives 'Question: ...\\nAnswer:';
    '{question}' gives a cloze task's raw text (HellaSwag, LAMBADA, ARC-style completions)."""
    solved = ''.join(fill(template, s) + delimiter + s['choices'][s['answer']] + '\n\n'
                     for s in shots)
    return solved + fill(template, item)


@torch.inference_mode()
def score_mcq(model, tokenizer, items, shots=(), batch_size=32, device='cpu', template=MCQ_TEMPLATE,
              delimiter=MCQ_DELIMITER, progress=False) -> dict:
    """acc and acc_norm as lm-evaluation-harness defines them for multiple_choice tasks: every
    choice is scored by the log-likelihood of delimiter + choice after mcq_context(item, shots,
    template, delimiter); acc takes the highest, acc_norm the highest divided by len(choice) in
    characters (the delimiter not counted). Prompt and choice tokens split as in the harness
    (_encode_pair): trailing whitespace of the prompt moves to the choice, the prompt is encoded
    alone and with the choice, and the choice's tokens are those after the prompt's count (an empty
    prompt is the end-of-text token); too long a row loses tokens on the left. Each (item, choice)
    is one row; rows go longest first, batch_size to a forward, right-padded."""
    T = model.config.block_size
    rows = []  # (tokens, number of scored tokens at the end)
    for item in items:
        context = mcq_context(item, shots, template, delimiter)
        stripped = context.rstrip()
        ctx_ids = tokenizer.encode(stripped) or [tokenizer.eot_id]
        for choice in item['choices']:
            whole = context + delimiter + choice
            cont = tokenizer.encode(whole)[len(ctx_ids):] if stripped else tokenizer.encode(whole)
            seq = (ctx_ids + cont)[-(T + 1):]
            rows.append((seq, min(len(cont), len(seq) - 1)))
    ll = -rows_nll(model, rows, batch_size, device, progress_bar(progress, len(rows),
                                                                'multiple choice', 'row'))
    acc, acc_norm, per_item, start = [], [], [], 0
    for item in items:
        lls = ll[start:start + len(item['choices'])]
        start += len(lls)
        # argmax: the first of equal scores, as the harness
        acc.append(np.argmax(lls) == item['answer'])
        lengths = np.array([len(c) for c in item['choices']])
        acc_norm.append(np.argmax(lls / lengths) == item['answer'])
        per_item.append(lls.tolist())
    return dict(acc=float(np.mean(acc)), acc_norm=float(np.mean(acc_norm)),
                correct=int(np.sum(acc)), items=len(items),
                chance=float(np.mean([1 / len(it['choices']) for it in items])),
                loglikelihoods=per_item)


# -----------------------------------------------------------------------------
# questions and answers: the answer's loss and the exact match of greedy answers, each item rendered
# and encoded as prepare.py stores it for training

# prepare.py's default record fields
QA_FIELDS = dict(text_key='text', prompt_key='prompt', completion_key='completion',
                 messages_key='messages')


def load_qa(path) -> list:
    """The items of a held-out JSONL file, a record per line (blank lines skipped), checked as
    prepare.py checks question/answer records (dataset.segments): a pair {"prompt", "completion"} or
    a conversation {"messages": [{"role", "content"}, ...]} ending with the assistant's turn; Error
    naming the file and line. Each item is the record's pair or its messages."""
    items = []
    for n, record in read_jsonl(path):
        where = f"{path}, line {n}"
        try:  # the template changes the text, never whether a record is valid
            ds.segments(record, QA_FIELDS, ds.TEMPLATE)
        except Error as e:
            raise Error(f"{where}: {e}") from None
        if 'messages' in record:
            items.append(dict(messages=record['messages']))
        elif 'text' in record and not {'prompt', 'completion'} & set(record):
            raise Error(f'{where}: a document ("text"), not a question with its answer; give '
                        f'{{"prompt", "completion"}} or {{"messages": [...]}}')
        else:
            items.append(dict(prompt=record['prompt'], completion=record['completion']))
    if not items:
        raise Error(f"{path} holds no questions (one JSON object per line)")
    return items


def qa_render(item, template=ds.TEMPLATE) -> tuple:
    """(prompt segments, answer, reference) of an item as prepare.py renders it: a pair's prompt as
    it is; a conversation with template, every turn before the last assistant's content (earlier
    answers and their end-of-text included). Training flags the answer's tokens and the end-of-text
    after it. reference: the completion or the last content, without the template's text after
    {content}, which the answer holds."""
    if 'messages' not in item:
        return [(item['prompt'], False)], item['completion'], item['completion']
    segs = ds.conversation(item['messages'], template, "'messages'")
    return segs[:-1], segs[-1][0], item['messages'][-1]['content']


def em_regexes(spec) -> list:
    """evaluate.py's em_regexes_to_ignore: text, split at each comma that no backslash escapes
    (a regex reads '\\,' as a comma), or a list (a config file's, or the key repeated) of whole
    regexes; each checked to be a regex (Error naming the one that is not)."""
    regexes = spec if isinstance(spec, list) else [r for r in re.split(r'(?<!\\),', spec) if r]
    for r in regexes:
        try:
            re.compile(r)
        except re.error as e:
            raise Error(f"em_regexes_to_ignore: {r!r} is not a regular expression ({e})") from None
    return regexes


def em_normalise(text, regexes_to_ignore=(), ignore_case=False, ignore_punctuation=False,
                 ignore_numbers=False) -> str:
    """text as lm-evaluation-harness's exact_match (exact_match_hf_evaluate) compares it: each regex
    of regexes_to_ignore removed in turn, then lower case, then string.punctuation removed, then
    the digits removed. Nothing else: whitespace stays as it is."""
    for r in regexes_to_ignore:
        text = re.sub(r, '', text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans('', '', string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans('', '', string.digits))
    return text


@torch.inference_mode()
def score_qa(model, tokenizer, items, template=ds.TEMPLATE, max_new_tokens=64, em=None,
             batch_size=16, device='cpu', progress=False) -> dict:
    """Held-out items (load_qa) rendered with template (qa_render), each segment encoded on its
    own as prepare.py encodes it. loss: the mean negative log-likelihood of the answers' tokens and
    the end-of-text after each (what training flags), weighted by tokens over all items; ppl: its
    exp. exact_match: the share of greedy answers (temperature 0, up to max_new_tokens, ended by the
    end-of-text) equal to their reference after em_normalise(**em), as the harness's exact_match. A
    prompt + answer over block_size + 1 tokens loses prompt tokens on the left, as in score_mcq
    (truncated: how many items)."""
    T, eot, em = model.config.block_size, tokenizer.eot_id, em or {}
    rows, rendered = [], []  # rows: (tokens, number of scored tokens at the end)
    for item in items:
        prompt, answer, reference = qa_render(item, template)
        ids = ds.encode_segments(tokenizer, prompt)[0].tolist() or [eot]
        ans = ds.encode_segments(tokenizer, [(answer, True), (None, True)])[0].tolist()
        seq = (ids + ans)[-(T + 1):]
        rows.append((seq, min(len(ans), len(seq) - 1)))
        rendered.append((ids[-T:], reference, answer[len(reference):],
                         len(ids) + len(ans) > T + 1))
    nll = rows_nll(model, rows, batch_size, device, progress_bar(progress, len(rows),
                                                                 'answer loss', 'item'))
    answers = []
    with progress_bar(progress, len(items), 'greedy answers', 'item') as bar:
        for (ids, reference, suffix, truncated), (_, n), total in zip(rendered, rows, nll):
            new = []
            x = torch.tensor([ids], dtype=torch.long, device=device)
            for token in model.generate_stream(x, max_new_tokens, temperature=0):
                if token.item() == eot:
                    break
                new.append(token.item())
            # the template's text after {content} (if any) is the rendering's, not the answer's
            text = tokenizer.decode(new)
            prediction = text[:-len(suffix)] if suffix and text.endswith(suffix) else text
            correct = em_normalise(prediction, **em) == em_normalise(reference, **em)
            answers.append(dict(prediction=prediction, reference=reference, correct=correct,
                                ended=len(new) < max_new_tokens, nll=float(total), tokens=n,
                                truncated=truncated))
            bar.update(1)
    tokens = sum(n for _, n in rows)
    loss = float(nll.sum() / tokens)
    correct = sum(a['correct'] for a in answers)
    return dict(loss=loss, ppl=math.exp(min(loss, 700)), tokens=tokens,
                exact_match=correct / len(items), correct=correct, items=len(items),
                truncated=sum(a['truncated'] for a in answers), max_new_tokens=max_new_tokens,
                answers=answers)


def training_metrics(model, tokenizer, mcq_items=None, prompts=None, seed=1337, device='cpu',
                     mcq_template=MCQ_TEMPLATE, mcq_delimiter=MCQ_DELIMITER) -> dict:
    """What train.py logs with eval_mcq / eval_generate (TRAINING_KEYS): the exam's acc and acc_norm
    (items from load_mcq(path, mcq_template)), and the generation metrics of evaluate.py's default
    settings. Silent (no progress bars). Call with the model in eval mode."""
    out = {}
    if mcq_items:
        mcq = score_mcq(model, tokenizer, mcq_items, device=device, template=mcq_template,
                        delimiter=mcq_delimiter)
        out.update(mcq_acc=mcq['acc'], mcq_acc_norm=mcq['acc_norm'])
    if prompts:
        samples = generate_samples(model, tokenizer, prompts, seed=seed, device=device)
        out.update(generation_metrics(samples))
    return out

# -----------------------------------------------------------------------------
# training curves

# what plot_log draws
PLOTTED = ('loss', 'lr', 'tokens_per_sec', 'train_loss', 'val_loss') + TRAINING_KEYS


def read_log(path) -> list:
    """The entries of train.py's log.jsonl: JSON objects with a "step" count, whose PLOTTED values
    and per-dataset val losses ('val_loss/NAME') are numbers or null; Error naming the first line
    that is not one."""
    entries = []
    for n, e in read_jsonl(path, hint='a torn last line? remove it'):
        step = e.get('step') if isinstance(e, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise Error(f"{path}, line {n}: not a record of train.py's "
                        f"(a JSON object with a \"step\" count)")
        for key in PLOTTED + tuple(k for k in e if k.startswith('val_loss/')):
            value = e.get(key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not number:
                raise Error(f"{path}, line {n}: {key}={e[key]!r} is not a number")
        entries.append(e)
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
        raise Error("--plot needs matplotlib: pip install matplotlib") from None
    # the extension names the format, given to savefig: without one it would write png_path + '.png'
    fmt = os.path.splitext(png_path)[1][1:].lower()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close('all')
    if fmt not in formats:
        what = 'no extension' if not fmt else f'.{fmt} is not an image format'
        raise Error(f"--plot={png_path}: {what}; "
                    f"end the name with one of {', '.join('.' + f for f in sorted(formats))}")
    train, evals = {}, {}
    for e in read_log(log_path):
        if 'loss' in e:
            train[e['step']] = e
        elif 'val_loss' in e:
            evals[e['step']] = e
    if not train and not evals:
        raise Error(f"{log_path} holds no training entries yet")
    extra = [k for k in TRAINING_KEYS if any(k in e for e in evals.values())]
    fig, axes = plt.subplots(3 + bool(extra), 1, figsize=(10, 10 + 3 * bool(extra)), sharex=True)

    def series(d, key):
        steps = sorted(s for s in d if d[s].get(key) is not None)
        return steps, [d[s][key] for s in steps]
    # train loss every log interval: a thin light line; the evals' train and val loss: marked lines
    # in colours far from it and from each other, drawn on top
    axes[0].plot(*series(train, 'loss'), label='train loss (per log interval)', color='tab:blue',
                 alpha=0.6, lw=1)
    axes[0].plot(*series(evals, 'train_loss'), 's--', label='train loss (eval)', color='black',
                 ms=5, lw=1.5)
    axes[0].plot(*series(evals, 'val_loss'), 'o-', label='val loss (eval)', color='tab:red',
                 ms=5, lw=1.5)
    # each dataset's own val loss (a mixture's, eval_datasets'): colours none of the above has,
    # dash-dotted with hollow markers, so that they stand apart from the whole val loss
    names = sorted({k for e in evals.values() for k in e if k.startswith('val_loss/')})
    colours, shapes = ['tab:orange', 'tab:green', 'tab:purple', 'tab:brown', 'tab:pink',
                       'tab:olive', 'tab:cyan', 'tab:gray'], '^vD<>ph*'
    for i, key in enumerate(names):
        axes[0].plot(*series(evals, key), ls='-.', marker=shapes[i % len(shapes)], mfc='none',
                     color=colours[i % len(colours)], ms=6, lw=1.3,
                     label=f"val loss ({key[len('val_loss/'):]})")
    axes[0].set_ylabel('loss (nats / token)')
    # losses fall: that corner is free
    axes[0].legend(loc='upper right', fontsize=9, framealpha=0.9)
    axes[1].plot(*series(train, 'lr'), color='tab:green')
    axes[1].set_ylabel('learning rate')
    axes[1].ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    axes[2].plot(*series(train, 'tokens_per_sec'), color='tab:purple')
    axes[2].set_ylabel('tokens / s')
    # shares are often equal (acc and acc_norm; repetition and code_parses both 0): each later line
    # is thinner and dashed otherwise, its markers smaller, of another shape and every other one
    # hollow, so a line drawn later never hides an earlier one
    dashes, markers = ['-', '--', ':', '-.'], 'os^Dv<>ph'
    for i, key in enumerate(extra):
        axes[-1].plot(*series(evals, key), marker=markers[i % len(markers)],
                      ls=dashes[i % len(dashes)], ms=11 - i, lw=3.2 - 0.3 * i,
                      mfc='none' if i % 2 else None, mew=1.5, label=key)
    if extra:
        axes[-1].set_ylabel('share (0 to 1)')
        axes[-1].set_ylim(-0.05, 1.05)
        # below the panel, as wide as it: a legend beside the curves would leave the panels above
        # a blank margin
        axes[-1].legend(loc='upper center', bbox_to_anchor=(0.5, -0.18), ncol=5, fontsize=9,
                        frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_title(f"training curves of {log_path}")
    axes[-1].set_xlabel('iteration')
    fig.tight_layout()
    fig.savefig(png_path, format=fmt, dpi=100, bbox_inches='tight')
    plt.close(fig)
