"""
Export a model to use it elsewhere: a Hugging Face GPT-2 directory (transformers, lm-evaluation-harness,
the Hub, anything that reads that format), or our own weights-only file.

    python export.py --ckpt=best --format=hf --out=hf_model                  # model.safetensors, config, tokenizer, card
    python export.py --ckpt=best --format=hf --out=hf_model --push_to_hub=USER/NAME
    python export.py --ckpt=best --out=model.safetensors                     # weights only, for sample.py / train.py
    python export.py --ckpt=nanogpt:ckpt.pt --format=hf --out=hf_model       # any model train.py can start from

Only the weights are written, never the optimizer state, and nothing existing is overwritten. A LoRA
checkpoint exports merged: base + adapter folded into plain weights, needing no LoRA at inference.
"""
import dataclasses
import os
import shutil
import sys
import time

import checkpoint
import interop
import runs
from configurator import configure
from model import check_finite, from_state

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt = 'best'  # 'best', 'resume', 'latest', 'step_0001000', a path, gpt2, hf:DIR, nanogpt:PATH
format = 'sturdygpt'  # 'sturdygpt' (our .safetensors, weights only) or 'hf' (a Hugging Face GPT-2 directory)
out = ''  # the file (sturdygpt) or new directory (hf) to write
push_to_hub = ''  # with format=hf: also upload the directory to this Hub repo, USER/NAME (HF_TOKEN or `hf auth login`)
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
config, _ = configure(defaults, sys.argv[1:], prog='export.py', source=__file__)
globals().update(config)

if format not in ('sturdygpt', 'hf'):
    raise SystemExit(f"export.py: error: format must be 'sturdygpt' or 'hf', got {format!r}")
if not out:
    raise SystemExit("export.py: error: say where to write: --out=FILE (sturdygpt) or --out=DIR (hf)")
if os.path.exists(out) and not (format == 'hf' and os.path.isdir(out) and not os.listdir(out)):
    raise SystemExit(f"export.py: error: {out} exists{' and is not an empty directory' if format == 'hf' else ''} "
                     f"(an export never overwrites anything; choose another --out)")
problem = runs.check_output(out, f"--out={out}", folder=format == 'hf')  # its folder, before any model is read
if problem:
    raise SystemExit(f"export.py: error: {problem}")
if push_to_hub and (format != 'hf' or push_to_hub.count('/') != 1):
    raise SystemExit(f"export.py: error: --push_to_hub=USER/NAME uploads a --format=hf export, got "
                     f"{push_to_hub!r} with format {format!r}")

path, state = runs.find_or_exit(ckpt, out_dir, 'export.py')
model = from_state(state)
model.merge_lora()  # LoRA adapters fold into the weights: what ships is a plain standalone model
t0 = time.time()
try:
    check_finite(model.state_dict())  # as train.py before each save: never ship nan (runs.find checked the input)
    if format == 'sturdygpt':
        info = ('tokenizer', 'config', 'data', 'iter_num', 'epoch', 'train_loss', 'val_loss', 'best_val_loss', 'time')
        checkpoint.save(out, {'model': model.state_dict(), 'model_args': dataclasses.asdict(model.config),
                              **{k: state[k] for k in info if k in state}})
    else:
        # written beside --out and renamed into place: an interrupted export leaves no half directory
        parent, name = os.path.split(os.path.abspath(out))
        tmp = os.path.join(parent, f'.{name}.tmp-{os.getpid()}')
        try:
            os.makedirs(tmp)
            interop.write_hf(tmp, model, state, push_to_hub or name)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
except (checkpoint.CheckpointError, ValueError, OSError) as e:  # ValueError: interop's refusals
    raise SystemExit(f"export.py: error: cannot export {path} to {out}: {e}")


def size(p):
    files = [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs] if os.path.isdir(p) else [p]
    return sum(os.path.getsize(f) for f in files) / 1e6


print(f"wrote {out} ({format}, {size(out):.1f} MB) from {path} ({size(path):.1f} MB) in {time.time() - t0:.2f}s")

if push_to_hub:
    from huggingface_hub import HfApi
    try:
        api = HfApi()  # token: HF_TOKEN, else the one `hf auth login` saved
        api.create_repo(push_to_hub, exist_ok=True)
        url = api.upload_folder(repo_id=push_to_hub, folder_path=out, commit_message=f"sturdygpt export of {path}")
    except Exception as e:  # offline, not logged in, no permission
        raise SystemExit(f"export.py: error: cannot upload to the Hub ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); the export is kept in {out}: log in (`hf auth login` "
                         f"or HF_TOKEN=...) and upload it with `hf upload {push_to_hub} {out}`")
    print(f"uploaded {out} to {url}")
