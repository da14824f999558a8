"""
Sample from a trained model, streaming the text as it is generated.

    python sample.py --start="def add"
    python sample.py --start=FILE:prompt.txt --num_samples=5 --max_new_tokens=500
    python sample.py --ckpt=best --temperature=0.7 --top_k=50 --top_p=0.9 --seed=7
    python sample.py --ckpt=gpt2 --start="The meaning of life"   # or hf:DIR, nanogpt:ckpt.pt

The checkpoint carries its tokenizer, so sampling works even after data/ is gone.
"""
import codecs
import sys
from contextlib import nullcontext

import torch

import checkpoint
import dataset as ds
import hardware
from configurator import check_ranges, configure
from model import from_state

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt = 'resume'  # 'resume' (the newest valid checkpoint), or 'best', 'latest', 'step_0001000', a path, gpt2, hf:DIR, nanogpt:PATH
start = ''  # the prompt, or FILE:path to read it from a file; empty starts a new document
num_samples = 3
max_new_tokens = 300
temperature = 0.8  # 0 is greedy
top_k = None  # keep only the k most likely tokens
top_p = 0.95  # nucleus sampling: the smallest set of tokens holding this much probability
seed = 1337
stop_at_eot = True  # end a sample at the end-of-text token, as the training documents do
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
config, _ = configure(defaults, sys.argv[1:], prog='sample.py', source=__file__)
check_ranges(config, dict(num_samples='[1, inf)', max_new_tokens='[0, inf)', temperature='[0, inf)',
                          top_k='[1, inf)', top_p='(0, 1]', seed='[0, 9223372036854775807]'), 'sample.py')
globals().update(config)

device, dtype = hardware.resolve(device, dtype)
device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        raise SystemExit(f"sample.py: error: cannot read prompt file {start[5:]}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise SystemExit(f"sample.py: error: prompt file {start[5:]} is not UTF-8 text (byte {e.start}: {e.reason})")
try:
    start.encode('utf-8')
except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
    raise SystemExit("sample.py: error: the prompt is not valid UTF-8 text") from None
path, state = checkpoint.find_or_exit(ckpt, out_dir, 'sample.py',
                                     hint=' (train a model first: python prepare.py && python train.py)')
model = from_state(state).eval().to(device)
model.merge_lora()  # a LoRA run's adapters fold into the weights: the same outputs, faster
tokenizer = ds.load_tokenizer(state['tokenizer'])
print(f"# {path}: iter {state.get('iter_num')}, val loss {state.get('val_loss')}", file=sys.stderr)
state = None

prompt = tokenizer.encode(start) if start else [tokenizer.eot_id]
x = torch.tensor([prompt[-model.config.block_size:]], dtype=torch.long, device=device)
generator = torch.Generator(device=device).manual_seed(seed)
for i in range(num_samples):
    sys.stdout.write(start)
    utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')  # a token may end mid-character
    with ctx:
        for token in model.generate_stream(x, max_new_tokens, temperature=temperature, top_k=top_k,
                                           top_p=top_p, generator=generator):
            t = token.item()
            if t == tokenizer.eot_id and stop_at_eot:
                break
            sys.stdout.write(utf8.decode(tokenizer.decode_bytes([t])))
            sys.stdout.flush()
    sys.stdout.write(utf8.decode(b'', final=True) + '\n' + '-' * 40 + '\n')
sys.stdout.flush()
