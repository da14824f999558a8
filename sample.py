"""
Sample from a trained model, streaming the text as it is generated.

    python sample.py --start="def add"
    python sample.py --start=FILE:prompt.txt --num_samples=5 --max_new_tokens=500
    python sample.py --ckpt=best --temperature=0.7 --top_k=50 --top_p=0.9 --seed=7
    python sample.py --ckpt=gpt2 --start="The meaning of life"   # or hf:DIR, nanogpt:ckpt.pt
    python sample.py --interactive              # a prompt per line; ':top_k 50' changes a setting
    python sample.py config/slm.py --start=def  # the run a training config wrote (its out_dir)
    python sample.py --ckpt=out-qa/best.safetensors --start="What is a list?"  # an answer
    python sample.py --ckpt=gpt2 --template=chat.json --start="Hi"   # a base model, asked as a chat

The checkpoint carries its tokenizer, so sampling works even after data/ is gone. A model trained
on conversations (its tokenizer record holds their template) gets each prompt as a user turn in
that template, then the assistant's prefix, and answers: the prompt is printed, then the answer.
"""
import codecs
import os
import sys

import torch

import dataset as ds
import hardware
import runs
from configurator import check_ranges, configure, script_keys
from errors import Error, report
from files import not_utf8, read_text
from weights import from_state

sys.excepthook = report  # an Error is one line, 'sample.py: error: ...'

# -----------------------------------------------------------------------------
out_dir = 'out'
# 'resume': the newest valid checkpoint
ckpt = 'resume'  # or 'best', 'latest', 'step_0001000', a path, gpt2, hf:DIR, nanogpt:PATH
start = ''  # the prompt, or FILE:path to read it from a file; empty starts a new document
num_samples = 3
max_new_tokens = 300
temperature = 0.8  # 0 is greedy
top_k = None  # keep only the k most likely tokens
top_p = 0.95  # nucleus sampling: the smallest set of tokens holding this much probability
seed = 1337
stop_at_eot = True  # end a sample at the end-of-text token, as the training documents do
# 'auto': a prompt is a user turn in the template the checkpoint's conversations were rendered
# with, plain text if it had none; 'none': plain text; or a template, a JSON file or JSON text as
# prepare.py's --template (a base model asked as its fine-tune will be)
template = 'auto'
interactive = False  # answer a prompt per line, keeping the model loaded; Ctrl-D or Ctrl-C leaves
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
# a training config file may be given: its training-only keys are ignored, a typo is still an error
train_keys = script_keys(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py'))
config, _ = configure(defaults, sys.argv[1:], source=__file__, ignore=train_keys)
# max_new_tokens: prompt + output are allocated up front (model.generate_stream), 8 bytes a token
RANGES = dict(num_samples='[1, inf)', max_new_tokens='[0, 1e7]', temperature='[0, inf)',
              top_k='[1, inf)', top_p='(0, 1]', seed='[0, 9223372036854775807]')
check_ranges(config, RANGES)
globals().update(config)

device, dtype = hardware.resolve(device, dtype)
ctx = hardware.autocast(device, dtype)

if start.startswith('FILE:'):
    start = read_text(start[5:], 'prompt file')
if not_utf8(start):
    raise Error("the prompt is not valid UTF-8 text")
chat = None if template in ('auto', 'none') else ds.read_template(template)  # before any model
path, state = runs.find(ckpt, out_dir)
model = from_state(state).eval().to(device)
model.merge_lora()  # a LoRA run's adapters fold into the weights: the same outputs, faster
tokenizer = ds.load_tokenizer(state['tokenizer'])
if template == 'auto':
    chat = state['tokenizer'].get('template')
if not start and not interactive:
    rendering = "no prompt: a new document"
elif chat is None:
    rendering = "prompt: plain text " + ("(the checkpoint was trained without conversations)"
                                         if template == 'auto' else "(--template=none)")
else:
    rendering = ("prompt: a user turn in " + ("the checkpoint's template" if template == 'auto'
                                              else f"the template of --template={template}")
                 + ", then the assistant's prefix; the model answers")
print(f"# {path}: iter {state.get('iter_num')}, val loss {state.get('val_loss')}; {rendering}",
      file=sys.stderr)
state = None


def encode(prompt):
    """A prompt's ids as training saw such text: with a template a user turn then the assistant's
    prefix, each segment encoded on its own as prepare.py encodes it; plain text otherwise; no
    prompt is a new document (after an end-of-text token)."""
    if not prompt:
        return [tokenizer.eot_id]
    if chat is None:
        return tokenizer.encode(prompt)
    turn = [dict(role='user', content=prompt)]
    segs = ds.conversation(turn, chat, 'the prompt', answer=False)
    return ds.encode_segments(tokenizer, segs)[0].tolist()


def stream(start, generator):
    """Write num_samples continuations of `start` as they are generated: after a templated prompt,
    the answer on the next line (the template's prefixes are not the model's words)."""
    prompt = encode(start)
    x = torch.tensor([prompt[-model.config.block_size:]], dtype=torch.long, device=device)
    for i in range(num_samples):
        sys.stdout.write(start + ('\n' if start and chat is not None else ''))
        # a token may end mid-character
        utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')
        with ctx:
            for token in model.generate_stream(x, max_new_tokens, temperature=temperature,
                                               top_k=top_k, top_p=top_p, generator=generator):
                t = token.item()
                if t == tokenizer.eot_id and stop_at_eot:
                    break
                sys.stdout.write(utf8.decode(tokenizer.decode_bytes([t])))
                sys.stdout.flush()
        sys.stdout.write(utf8.decode(b'', final=True) + '\n' + '-' * 40 + '\n')
    sys.stdout.flush()


if not interactive:
    stream(start, torch.Generator(device=device).manual_seed(seed))
    sys.exit(0)

# interactive: every prompt starts from `seed`, so the same prompt and settings give the same text
SETTINGS = ('temperature', 'top_k', 'top_p', 'max_new_tokens', 'num_samples', 'seed', 'stop_at_eot')
try:
    import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
except ImportError:
    pass
# bytes that are not UTF-8 come in as lone surrogates, as on the command line, instead of a
# UnicodeDecodeError that would end the loop; not_utf8 then refuses that one line
if hasattr(sys.stdin, 'reconfigure'):  # a TextIOWrapper (always, but for a caller's stand-in)
    sys.stdin.reconfigure(errors='surrogateescape')
try:
    print(f"# a prompt per line (end a line with \\ to go on to the next); "
          f"':temperature 0.7' sets one of {', '.join(SETTINGS)}; ':' shows them; "
          f"Ctrl-D or Ctrl-C leaves", file=sys.stderr)
    while True:
        line = input('> ')
        while line.endswith('\\'):
            line = line[:-1] + '\n' + input('. ')
        if not line.strip():
            continue
        if not_utf8(line):
            print("sample.py: error: that line is not valid UTF-8 text "
                  "(set your terminal to UTF-8); it was skipped", file=sys.stderr)
            continue
        if line.startswith(':'):
            key, _, value = line[1:].strip().partition(' ')
            try:
                if key:
                    new, _ = configure({k: defaults[k] for k in SETTINGS},
                                       [f'--{key}={value.strip()}'])
                    check_ranges(new, RANGES)  # the other keys are at their (valid) defaults
                    if isinstance(new[key], str):  # top_k's default is None, which takes any value
                        raise Error(f"{key} must be a number, got {value.strip()!r}")
                    globals()[key] = new[key]
            except Error as e:  # a typo in a setting: said as any error is, and the session goes on
                report(Error, e, None)
            print('# ' + ', '.join(f"{k}={globals()[k]}" for k in SETTINGS), file=sys.stderr)
            continue
        stream(line, torch.Generator(device=device).manual_seed(seed))
except (EOFError, KeyboardInterrupt):
    sys.stdout.write('\n')
