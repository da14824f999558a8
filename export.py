"""
Export a model to use it elsewhere: a Hugging Face GPT-2 directory (transformers,
lm-evaluation-harness, the Hub, anything that reads that format), or our own weights-only file.

    # model.safetensors, config, tokenizer, card
    python export.py --ckpt=best --format=hf --out=hf_model
    python export.py --ckpt=best --format=hf --out=hf_model --push_to_hub=USER/NAME
    # weights only, for sample.py / train.py
    python export.py --ckpt=best --out=model.safetensors
    # any model train.py can start from
    python export.py --ckpt=nanogpt:ckpt.pt --format=hf --out=hf_model

Only the weights are written, never the optimizer state, and nothing existing is overwritten. A LoRA
checkpoint exports merged: base + adapter folded into plain weights, needing no LoRA at inference.
"""
import dataclasses
import os
import shutil
import sys
import time

import checkpoint
import files
import interop
import runs
from configurator import configure
from errors import Error, oneline, report
from weights import check_finite, from_state

sys.excepthook = report  # an Error is one line, 'export.py: error: ...'

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt = 'best'  # 'best', 'resume', 'latest', 'step_0001000', a path, gpt2, hf:DIR, nanogpt:PATH
# 'sturdygpt' (our .safetensors, weights only) or 'hf' (a Hugging Face GPT-2 directory)
format = 'sturdygpt'
out = ''  # the file (sturdygpt) or new directory (hf) to write
# with format=hf: also upload the directory to this Hub repo (HF_TOKEN or `hf auth login`)
push_to_hub = ''  # USER/NAME
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
config, _ = configure(defaults, sys.argv[1:], source=__file__)
globals().update(config)

if format not in ('sturdygpt', 'hf'):
    raise Error(f"format must be 'sturdygpt' or 'hf', got {format!r}")
if not out:
    raise Error("say where to write: --out=FILE (sturdygpt) or --out=DIR (hf)")
if os.path.exists(out) and not (format == 'hf' and os.path.isdir(out) and not os.listdir(out)):
    raise Error(f"{out} exists{' and is not an empty directory' if format == 'hf' else ''} "
                f"(an export never overwrites anything; choose another --out)")
files.check_output(out, f"--out={out}", folder=format == 'hf')  # before any model is read
if push_to_hub and (format != 'hf' or push_to_hub.count('/') != 1):
    raise Error(f"--push_to_hub=USER/NAME uploads a --format=hf export, got {push_to_hub!r} "
                f"with format {format!r}")

path, state = runs.find(ckpt, out_dir)
model = from_state(state)
model.merge_lora()  # LoRA adapters fold into the weights: what ships is a plain standalone model
check_finite(model.state_dict())  # as train.py before each save: never ship nan
t0 = time.time()
if format == 'sturdygpt':
    info = ('tokenizer', 'config', 'data', 'iter_num', 'epoch', 'train_loss', 'val_loss',
            'best_val_loss', 'time')
    checkpoint.save(out, {'model': model.state_dict(),
                          'model_args': dataclasses.asdict(model.config),
                          **{k: state[k] for k in info if k in state}})
else:  # built beside --out and renamed into place: an interrupted export leaves no half directory
    tmp = files.temp_dir(out)
    try:
        os.makedirs(tmp)
        interop.write_hf(tmp, model, state, push_to_hub or os.path.basename(os.path.abspath(out)))
        files.publish_dir(tmp, out)
    except OSError as e:
        raise Error(f"cannot export {path} to {out}: {oneline(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def size(p):
    paths = [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs] if os.path.isdir(p) else [p]
    return sum(os.path.getsize(f) for f in paths) / 1e6


print(f"wrote {out} ({format}, {size(out):.1f} MB) from {path} ({size(path):.1f} MB) "
      f"in {time.time() - t0:.2f}s")

if push_to_hub:
    from huggingface_hub import HfApi
    try:
        api = HfApi()  # token: HF_TOKEN, else the one `hf auth login` saved
        api.create_repo(push_to_hub, exist_ok=True)
        url = api.upload_folder(repo_id=push_to_hub, folder_path=out,
                                commit_message=f"sturdygpt export of {path}")
    except Exception as e:  # offline, not logged in, no permission
        raise Error(f"cannot upload to the Hub ({type(e).__name__}: {oneline(e)[:200]}); "
                    f"the export is kept in {out}: log in (`hf auth login` or HF_TOKEN=...) and "
                    f"upload it with `hf upload {push_to_hub} {out}`") from None
    print(f"uploaded {out} to {url}")
