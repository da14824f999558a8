"""
Evaluate checkpoints: perplexity and bits per byte, generation quality (repetition, distinct-n,
Python validity), multiple-choice accuracy, the answers to held-out questions (their loss, exact
match); one table, and JSON with every number and setting.

    python evaluate.py                                  # newest valid one in out/, default metrics
    python evaluate.py --ckpt=best,latest,step_0001000  # several checkpoints, one comparison table
    python evaluate.py --mcq=exam.jsonl --json=eval.json
    # a cloze task, scored as the harness does:
    python evaluate.py --mcq=cloze.jsonl --mcq_template='{question}'
    python evaluate.py --text=notes/ --stride=64        # perplexity of other text: a file or folder
    python evaluate.py --qa=held_out.jsonl --em_ignore_case  # answer loss and exact match
    python evaluate.py --plot=out/curves.png            # only training curves, from out/log.jsonl
    python evaluate.py config/slm.py                    # the out_dir a training config wrote

Every metric and format is defined in README.md, "Evaluating a model", and docs/evaluation.md.
Progress bars go to stderr on a terminal; stderr also gets one line per finished stage, stdout the
table.
"""
import fnmatch
import json as jsonlib  # the config key `json` names the output file
import math
import os
import sys
import time

import numpy as np

import dataset as ds
import files
import hardware
import metrics
import runs
from configurator import check_ranges, configure, script_keys
from errors import Error, report
from weights import from_state

sys.excepthook = report  # an Error is one line, 'evaluate.py: error: ...'

# -----------------------------------------------------------------------------
out_dir = 'out'  # where the checkpoints (and log.jsonl, for --plot) are
# 'resume': the newest valid checkpoint, its column named by its file
ckpt = 'resume'  # or 'best', 'latest', 'step_0001000', a path; several: 'best,latest'
# perplexity and bits per byte
# the split to score ('val' or 'train') of the checkpoint's dataset (of a mixture: the first);
# '' skips perplexity
split = 'val'
data_dir = 'data'  # where prepared datasets are
dataset = None  # score this dataset's split, not the checkpoint's (re-encoded if tokenizers differ)
text = None  # score a UTF-8 text file, or a folder's files, not a split (each file a document)
text_glob = '*'  # file name pattern inside a text folder
# None: non-overlapping windows of block_size; S: windows S apart, each scoring its last S tokens
stride = None
max_tokens = None  # score only the split's first max_tokens tokens (as stored)
batch_size = 16  # windows, or multiple-choice rows, per forward
# generation: repetition, distinct-n, Python validity
generate = True  # sample the prompts and measure the samples
prompts = None  # a file, a prompt per line (in double quotes: a JSON string); None: 3 code prompts
num_samples = 5  # samples per prompt, drawn with seed + the prompt's index
max_new_tokens = 200  # a sample ends here or at its first end-of-text token
temperature = 0.8  # as sample.py: 0 is greedy
top_k = None  # keep only the k most likely tokens
top_p = 0.95  # nucleus sampling
code = True  # also the share of samples that parse as Python and that use Python keywords
# multiple choice
# a JSONL exam: {"question", "choices": [...], "answer"} or {"question", "A", ..., "E", "answer"}
mcq = None
# each item's prompt over its fields; cloze: '{question}'
mcq_template = metrics.MCQ_TEMPLATE  # the harness's 'Question: {question}\nAnswer:'
# between the prompt and each choice
mcq_delimiter = metrics.MCQ_DELIMITER  # the harness's target_delimiter, ' '
fewshot = 0  # put this many solved examples (the first of fewshot_file) before each question
fewshot_file = None  # a JSONL exam (either format) of the solved examples, shown with mcq_template
# questions and answers: the loss of the answers, the exact match of greedy ones
# a JSONL file, a line each: {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}
qa = None
qa_max_new_tokens = 64  # a greedy answer ends here or at its end-of-text token
# how conversations are rendered: 'auto', the checkpoint's template (dataset.TEMPLATE for a model
# trained without conversations); or a JSON file or JSON text, as prepare.py's --template
template = 'auto'
# exact match compares the strings as they are unless these are set (lm-evaluation-harness's
# exact_match options, off there too)
# regexes removed, in turn, from both: comma-separated (a comma inside one is \,), or a list
em_regexes_to_ignore = ''
em_ignore_case = False  # lower case both
em_ignore_punctuation = False  # remove string.punctuation from both
em_ignore_numbers = False  # remove the digits from both
# output
json = None  # also write every number, the samples and the settings to this JSON file
plot = None  # draw the curves of out_dir/log.jsonl into this image (.png, .svg, .pdf) and stop
seed = 1337  # the samples' seed: the same seed gives the same samples and numbers
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16/float16 on GPU, float32 on CPU), 'float32', 'bfloat16', 'float16'
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
# a training config file may be given: its training-only keys are ignored, a typo is still an error
train_keys = script_keys(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py'))
config, _ = configure(defaults, sys.argv[1:], source=__file__, ignore=train_keys,
                      repeatable={'em_regexes_to_ignore'})
# max_new_tokens: prompt + output ids are allocated up front (model.generate_stream), like sample.py
check_ranges(config, {'stride': '[1, inf)', 'max_tokens': '[1, inf)', 'batch_size': '[1, inf)',
                      'num_samples': '[1, inf)', 'max_new_tokens': '[1, 1e7]',
                      'temperature': '[0, inf)', 'top_k': '[1, inf)', 'top_p': '(0, 1]',
                      'fewshot': '[0, inf)', 'seed': '[0, 9223372036854775807]',
                      'qa_max_new_tokens': '[1, 1e7]'})
globals().update(config)

# every output is checked before the work that fills it: no evaluation is lost to a typo in --json
for key in ('plot', 'json'):
    if config[key] is not None:
        files.check_output(config[key], f"--{key}={config[key]}")
if plot:
    metrics.plot_log(os.path.join(out_dir, 'log.jsonl'), plot)
    print(f"wrote {plot}")
    sys.exit(0)

# every input file is read before any model is loaded
if split not in ('', 'train', 'val'):
    raise Error(f"split must be 'val', 'train' or '' (no perplexity), got {split!r}")
# a prompt's num_samples are one batch: that many rows of up to max_new_tokens ids (8 bytes) at once
memory = hardware.memory_bytes() or math.inf
if generate and num_samples * max_new_tokens * 8 > memory:
    raise Error(f"num_samples={num_samples} x max_new_tokens={max_new_tokens} token ids are "
         f"{num_samples * max_new_tokens * 8 / 2**30:,.0f} GiB at once, more than this machine's "
         f"{memory / 2**30:,.0f} GiB of memory; lower one of them")
names = [n.strip() for n in ckpt.split(',') if n.strip()]
if not names:
    raise Error(f"--ckpt={ckpt!r} names no checkpoint; "
                f"give one or more, comma-separated: best,latest")
texts = None
if text is not None:
    if not os.path.exists(text):
        raise Error(f"--text={text}: no such file or folder")
    # a folder's regular files (a FIFO in it would block, as prepare.py skips them); a path that
    # is not a folder is read as given (read_text refuses a named FIFO, takes <(cat notes))
    paths = [text] if not os.path.isdir(text) else sorted(
        os.path.join(d, f) for d, _, found in os.walk(text) for f in found
        if not f.startswith('.') and fnmatch.fnmatch(f, text_glob)
        and os.path.isfile(os.path.join(d, f)))
    if not paths:
        raise Error(f"--text={text}: no file matches --text_glob={text_glob}")
    texts = [files.read_text(f) for f in paths]
prompt_list = metrics.load_prompts(prompts) if generate else []
if mcq:
    metrics.template_fields(mcq_template)  # a template that is not one: said once, not per line
    if files.not_utf8(mcq_template + mcq_delimiter):  # bytes that are not UTF-8 on the command line
        raise Error("mcq_template or mcq_delimiter is not valid UTF-8 text")
items = metrics.load_mcq(mcq, mcq_template) if mcq else []
if fewshot and not fewshot_file:
    raise Error(f"fewshot={fewshot} needs fewshot_file=FILE (solved examples in the exam's format)")
shots = metrics.load_mcq(fewshot_file, mcq_template)[:fewshot] if fewshot else []
if len(shots) < fewshot:
    raise Error(f"fewshot={fewshot} but {fewshot_file} holds only {len(shots)} items")
qa_items = metrics.load_qa(qa) if qa else []
conversations = sum('messages' in item for item in qa_items)
# a template given is read now; 'auto' is each checkpoint's own
user_template = None if template in ('auto', 'none') else ds.read_template(template)
if template == 'none' and conversations:
    raise Error(f"--template=none: {qa} holds conversations, which are rendered with a template; "
                f"give 'auto' (the checkpoint's) or a template")
em = dict(regexes_to_ignore=metrics.em_regexes(em_regexes_to_ignore), ignore_case=em_ignore_case,
          ignore_punctuation=em_ignore_punctuation, ignore_numbers=em_ignore_numbers)

device, dtype = hardware.resolve(device, dtype)
ctx = hardware.autocast(device, dtype)


def tokens_to_score(state, tokenizer):
    """(token stream, where from) for perplexity: the text files, or the split, re-encoded with this
    checkpoint's tokenizer when the dataset was prepared with another one."""
    if texts is not None:
        return metrics.encode_docs(tokenizer, texts), f"{text} ({len(texts)} file(s))"
    # a checkpoint trained on a mixture: its first dataset
    path = os.path.join(data_dir, dataset or ds.parse_mixture(state['data']['dataset'])[0][0])
    meta = ds.read_meta(path)
    tokens = ds.open_split(path, split)[:max_tokens]
    vocab_size = meta['tokenizer']['vocab_size']
    # its tokenizer would fail on it, and the embedding too
    if len(tokens) and tokens.max() >= vocab_size:
        raise Error(f"{path} {split} split holds token id {tokens.max()} "
                    f"but its vocabulary has {vocab_size} tokens "
                    f"(the dataset is damaged; rebuild it: python prepare.py --force ...)")
    source = f"{path} {split} split" + (f" (first {max_tokens:,} tokens)" if max_tokens else "")
    if meta['tokenizer']['fingerprint'] != tokenizer.fingerprint:
        data_tok = ds.load_tokenizer(ds.tokenizer_state(path))
        docs = np.split(tokens, np.flatnonzero(tokens == data_tok.eot_id) + 1)
        decoded = [data_tok.decode(d[d != data_tok.eot_id]) for d in docs if len(d)]
        tokens = metrics.encode_docs(tokenizer, decoded)
        source += f", re-encoded with the checkpoint's {tokenizer.kind} tokenizer"
    return tokens, source


def cells(r):
    """One checkpoint's column of the table: {row label: formatted value}."""
    out = {'iter': str(r['iter_num'])}
    if 'perplexity' in r:
        p = r['perplexity']
        out.update({'tokens scored': f"{p['tokens']:,}", 'loss (nats/token)': f"{p['loss']:.4f}",
                    'perplexity': f"{p['ppl']:.2f}", 'bits per byte': f"{p['bits_per_byte']:.4f}"})
    for key, value in r.get('generation', {}).items():
        if key != 'samples':
            out[key.replace('_', ' ').replace('distinct ', 'distinct-')] = f"{value:.3f}"
    if 'mcq' in r:
        m = r['mcq']
        out['mcq acc'] = f"{m['acc']:.3f} ({m['correct']}/{m['items']})"
        out['mcq acc_norm'] = f"{m['acc_norm']:.3f}"
    if 'qa' in r:
        q = r['qa']
        out['answer loss'] = f"{q['loss']:.4f} ({q['tokens']:,} tokens)"
        out['answer perplexity'] = f"{q['ppl']:.2f}"
        out['exact match'] = f"{q['exact_match']:.3f} ({q['correct']}/{q['items']})"
        out['prompts truncated'] = str(q['truncated'])
    return out


def note(msg):
    """A line on stderr: what was loaded, and each finished stage with its time, for a terminal and
    a log alike."""
    print(msg, file=sys.stderr, flush=True)


results = []
for k, name in enumerate(names, 1):
    t0 = time.time()
    path, state = runs.find(name, out_dir)
    # 'resume' says how it was found, not what: name the column by the file it found
    # (latest, step_0000600)
    label = name
    if name == 'resume':
        label = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    model = from_state(state).eval().to(device)  # a LoRA adapter checkpoint comes with its base
    r = dict(name=label, path=path, iter_num=state.get('iter_num'), val_loss=state.get('val_loss'),
             block_size=model.config.block_size, params=model.num_params())
    count = f" ({k}/{len(names)})" if len(names) > 1 else ''
    note(f"# {label}{count}: {path}, iter {r['iter_num']}, {r['params'] / 1e6:.2f}M parameters")
    if stride and stride > model.config.block_size:  # tokens between its windows would go unscored
        raise Error(f"--stride={stride} is larger than the block_size {model.config.block_size} "
                    f"of {path}")
    tokenizer = ds.load_tokenizer(state['tokenizer'])
    r['tokenizer'] = dict(kind=tokenizer.kind, fingerprint=tokenizer.fingerprint)
    with ctx:
        if split or texts is not None:
            t = time.time()
            tokens, source = tokens_to_score(state, tokenizer)
            p = metrics.perplexity(model, tokens, tokenizer, stride, batch_size, device,
                                   progress=True)
            if p['stride'] == p['block_size']:
                scheme = f"non-overlapping windows of {p['block_size']} tokens"
            else:
                scheme = (f"windows of {p['block_size']} tokens every {p['stride']}, "
                          f"each scoring its last {p['stride']}")
            r['perplexity'] = dict(p, scored=f"{source}, {p['bytes']:,} bytes; {scheme}")
            note(f"# {label}: perplexity over {p['tokens']:,} tokens ({p['windows']:,} windows) "
                 f"in {time.time() - t:.1f}s")
        if prompt_list:
            t = time.time()
            samples = metrics.generate_samples(model, tokenizer, prompt_list, num_samples,
                                               max_new_tokens, temperature, top_k, top_p, seed,
                                               device, progress=True)
            r['generation'] = dict(metrics.generation_metrics(samples, code), samples=samples)
            note(f"# {label}: {len(samples)} samples generated in {time.time() - t:.1f}s")
        if items:
            t = time.time()
            r['mcq'] = metrics.score_mcq(model, tokenizer, items, shots, batch_size, device,
                                         mcq_template, mcq_delimiter, progress=True)
            note(f"# {label}: {len(items)} multiple-choice items scored in {time.time() - t:.1f}s")
        if qa_items:
            t = time.time()
            chat, source = user_template, f"--template={template}"
            if chat is None:
                chat, source = state['tokenizer'].get('template'), "the checkpoint's"
            if chat is None and conversations:  # rendered as prepare.py renders them by default
                chat, source = dict(ds.TEMPLATE), "the default (dataset.TEMPLATE)"
                note(f"# {label}: trained without conversations; {qa}'s conversations are "
                     f"rendered with the default template (dataset.TEMPLATE)")
            r['qa'] = dict(metrics.score_qa(model, tokenizer, qa_items, chat, qa_max_new_tokens,
                                            em, batch_size, device, progress=True),
                           template=chat, template_from=source if conversations else None)
            note(f"# {label}: {len(qa_items)} question/answer items scored in "
                 f"{time.time() - t:.1f}s")
    note(f"# {label}: evaluated in {time.time() - t0:.1f}s")
    results.append(r)
    state = model = None  # free before the next checkpoint

# -----------------------------------------------------------------------------
# what was measured, then the table: one column per checkpoint
scored = {r['name']: r['perplexity']['scored'] for r in results if 'perplexity' in r}
for name, what in scored.items():
    print(f"perplexity{f' ({name})' if len(set(scored.values())) > 1 else ''}: {what}")
    if len(set(scored.values())) == 1:
        break
if prompt_list:
    print(f"generation: {len(prompt_list)} prompts x {num_samples} samples, "
          f"up to {max_new_tokens} new tokens, temperature {temperature}, top_k {top_k}, "
          f"top_p {top_p}, seed {seed}")
if items:
    print(f"multiple choice: {mcq}, {len(items)} items, {fewshot}-shot, "
          f"chance {results[0]['mcq']['chance']:.3f}, "
          f"each choice scored after {mcq_template!r} + {mcq_delimiter!r}")
if qa_items:
    on = [k for k, v in em.items() if v and k != 'regexes_to_ignore']
    on += [f"regexes_to_ignore {em['regexes_to_ignore']}"] * bool(em['regexes_to_ignore'])
    print(f"question/answer: {qa}, {len(qa_items)} items ({conversations} conversations); "
          f"answer loss over the answers' tokens and their end-of-text; exact match of greedy "
          f"answers up to {qa_max_new_tokens} new tokens, "
          + (f"with {', '.join(on)}" if on else "the strings as they are"))
columns = [cells(r) for r in results]
table = [[''] + [r['name'] for r in results]]
for label in columns[0]:
    table.append([label] + [c.get(label, '-') for c in columns])
widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
for row in table:
    print('  '.join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))

if json:
    out = dict(settings=dict(config, device=device, dtype=dtype, prompt_texts=prompt_list),
               checkpoints=results)
    files.write_atomic(json, jsonlib.dumps(out, indent=1, ensure_ascii=False))
    print(f"wrote {json}")
