"""
What sturdygpt does on a CUDA GPU, in one command, on whatever CUDA device is present:

    python bench/bench_gpu.py                          # every section, ~7 minutes on one H100
    python bench/bench_gpu.py --only=train,pad --batch_sizes=12,16
    python bench/bench_gpu.py --small --device=cpu     # the same steps on a tiny model (checks this script)

train:   config/slm.py's model (GPT-2 small: 12x12x768, block 1024, vocabulary 50257 padded to 50304)
         in bfloat16 through train.py, eager and compiled: tokens/s, MFU against the datasheet
         peak (hardware.py), peak memory
pad:     one training step of that model with the vocabulary padded to 50304 and unpadded
float16: float16 + GradScaler for 300 steps: loss finite and falling; stopped at 150 and resumed,
         the scaler state and the losses continue
resume:  two uninterrupted runs and one killed with SIGKILL mid-run and resumed: which numbers
         are bit-exact on this device
sample:  KV-cache generation tokens/s against recomputing the full context
ddp:     torchrun --nproc_per_node=1 with nccl against one plain process

Data: the stdlib corpus with a 50257-token BPE (GPT-2's vocabulary size; tiktoken's own GPT-2 file
needs the network), prepared once as data/stdlib_bpe50k. Each train.py run logs to --log_dir.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import hardware  # noqa: E402
from model import GPT, GPTConfig, pad_vocab  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument('--only', default='train,pad,float16,resume,sample,ddp')
ap.add_argument('--device', default='cuda')
ap.add_argument('--batch_sizes', default='12', help='micro-batch sizes for the compiled train runs')
ap.add_argument('--iters', type=int, default=40, help='iterations of each train run')
ap.add_argument('--small', action='store_true', help='a tiny model instead of GPT-2 small')
ap.add_argument('--log_dir', default=os.environ.get('OUT') or tempfile.mkdtemp(prefix='bench_gpu_'))
args = ap.parse_args()
DATASET = 'stdlib_bpe50k'
SLM = ['config/slm.py', f'--dataset={DATASET}', f'--device={args.device}', '--gradient_accumulation_steps=8']
SMALL = ['config/python_code.py', f'--dataset={DATASET}', f'--device={args.device}']  # 4x4x256, block 256
DIMS = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # GPT-2 small, in-process sections
if args.small:
    DIMS = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
    SLM = SMALL + ['--n_layer=2', '--n_embd=64', '--n_head=2', '--block_size=64', '--compile=False']
    SMALL = SLM
QUIET = ['--eval_interval=1000000', '--ckpt_interval=0', '--rolling_interval=0', '--save_best=False',
         '--save_epochs=False', '--log_interval=5']
results = []  # (section, line) for the table at the end


def report(section, line):
    results.append((section, line))
    print(f"[{section}] {line}", flush=True)


def train(name, argv, out, env=None):
    """Run train.py to completion; its output goes to log_dir/name.log. Returns the log records."""
    with open(os.path.join(args.log_dir, f'{name}.log'), 'w') as f:
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *argv, f'--out_dir={out}'],
                           cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if p.returncode:
        raise RuntimeError(f"train.py exited {p.returncode}; see {name}.log")
    return read_log(out)


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def losses(log):
    return {e['step']: e['loss'] for e in log if 'loss' in e}  # the last record of an iteration wins


def steady(log):
    """Median tokens/s and MFU past the first two logged intervals (warm-up, compilation), peak memory."""
    rows = [e for e in log if e.get('tokens_per_sec')][2:] or [e for e in log if e.get('tokens_per_sec')]
    mfu = [e['mfu'] for e in rows if e.get('mfu')]
    return (statistics.median(e['tokens_per_sec'] for e in rows), statistics.median(mfu) if mfu else None,
            max((e.get('peak_mem_gib') or 0) for e in rows))


def sync():
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()


def section_train():
    peak = hardware.peak_flops(hardware.resolve(args.device, 'bfloat16')[0], 'bfloat16')
    runs = [(False, int(args.batch_sizes.split(',')[0]))] + [(True, int(b)) for b in args.batch_sizes.split(',')]
    for compile, bs in runs:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            log = train(f'train_compile{int(compile)}_b{bs}', [*SLM, *QUIET, '--dtype=bfloat16', f'--batch_size={bs}',
                                                               f'--compile={compile}', f'--max_iters={args.iters}'], out)
            tok_s, mfu, mem = steady(log)
        report('train', f"bfloat16, compile={compile}, micro-batch {bs}x{'64' if args.small else '1024'}: "
                        f"{tok_s:,.0f} tokens/s, MFU {f'{mfu:.1f}%' if mfu else 'unknown'} of "
                        f"{f'{peak / 1e12:.3g} TFLOP/s' if peak else 'an unknown peak'}, peak memory {mem:.1f} GiB "
                        f"({time.time() - t0:.0f} s for the run, compilation included)")


def section_pad():
    """One fwd + bwd + AdamW step, the vocabulary padded or not: eager bfloat16, median of 20."""
    bs = 4 if args.small else 12
    times = {}
    for padded in (pad_vocab(50257), None):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50257, padded_vocab_size=padded, **DIMS)).to(args.device)
        opt = model.configure_optimizer(0.1, 6e-4, (0.9, 0.95), args.device.split(':')[0])
        x = torch.randint(0, 50257, (bs, DIMS['block_size']), device=args.device)
        samples = []
        for i in range(25):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(args.device.split(':')[0], dtype=torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= 5:
                samples.append(time.perf_counter() - t0)
        times[padded] = statistics.median(samples)
        del model, opt
    report('pad', f"one step of {bs}x{DIMS['block_size']} tokens, eager bfloat16: vocabulary 50304 (padded) "
                  f"{times[pad_vocab(50257)] * 1000:.1f} ms, 50257 {times[None] * 1000:.1f} ms: padded is "
                  f"{times[None] / times[pad_vocab(50257)]:.2f}x as fast")


def section_float16():
    common = [*SMALL, '--dtype=float16', '--lr_decay_iters=300', '--ckpt_interval=50', '--eval_interval=100',
              '--rolling_interval=0', '--save_epochs=False', '--log_interval=10']
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        la = losses(train('float16_straight', [*common, '--max_iters=300'], a))
        train('float16_first_half', [*common, '--max_iters=150'], b)
        lb = losses(train('float16_resumed', [*common, '--max_iters=300', '--init_from=resume'], b))
        sa = checkpoint.load(os.path.join(a, 'latest.safetensors'))['scaler']
        sb = checkpoint.load(os.path.join(b, 'latest.safetensors'))['scaler']
    finite = all(v == v and abs(v) != float('inf') for v in la.values())
    diff = max(abs(la[k] - lb[k]) for k in la)
    report('float16', f"300 steps: loss {la[min(la)]:.3f} -> {la[max(la)]:.3f}, all finite: {finite}; scaler at "
                      f"300 {sa}; stopped at 150 and resumed: scaler state {'equal' if sa == sb else 'DIFFERENT'}, "
                      f"largest loss difference {diff:.2e}")


def section_resume():
    common = [*SMALL, '--dtype=bfloat16', '--max_iters=100', '--ckpt_interval=10', '--eval_interval=50',
              '--rolling_interval=0', '--save_epochs=False', '--log_interval=1', '--compile=False']
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as a2, \
            tempfile.TemporaryDirectory() as b:
        la, la2 = losses(train('resume_straight', common, a)), losses(train('resume_straight2', common, a2))
        wa = checkpoint.load(os.path.join(a, 'latest.safetensors'))['model']
        wa2 = checkpoint.load(os.path.join(a2, 'latest.safetensors'))['model']
        with open(os.path.join(args.log_dir, 'resume_killed.log'), 'w') as f:
            p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *common, f'--out_dir={b}'],
                                 cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            while not any(e.get('step', 0) >= 45 for e in (read_log(b) if os.path.exists(
                    os.path.join(b, 'log.jsonl')) else [])):
                if p.poll() is not None:
                    raise RuntimeError("the run to be killed ended early; see resume_killed.log")
                time.sleep(0.05)
            p.send_signal(signal.SIGKILL)
            p.wait()
        killed_at = max(losses(read_log(b)))
        lb = losses(train('resume_resumed', [*common, '--init_from=resume'], b))
        wb = checkpoint.load(os.path.join(b, 'latest.safetensors'))['model']
    same = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)
    d2, db = max(abs(la[k] - la2[k]) for k in la), max(abs(la[k] - lb[k]) for k in la)
    report('resume', f"two uninterrupted runs: losses differ by up to {d2:.2e}, final weights "
                     f"{'bit-identical' if same(wa, wa2) else 'differ'}; killed (SIGKILL) at iteration {killed_at} "
                     f"and resumed: losses differ from uninterrupted by up to {db:.2e}, final weights "
                     f"{'bit-identical' if same(wa, wb) else 'differ'}")


def section_sample():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, padded_vocab_size=pad_vocab(50257), **DIMS)).to(args.device).eval()
    prompt = torch.randint(0, 50257, (1, 16), device=args.device)
    new = 50 if args.small else 500
    rates = {}
    for use_cache in (True, False):
        with torch.autocast(args.device.split(':')[0], dtype=torch.bfloat16):
            model.generate(prompt, 20, use_cache=use_cache)  # warm-up
            best = float('inf')
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                model.generate(prompt, new, use_cache=use_cache,
                               generator=torch.Generator(args.device).manual_seed(0))
                sync()
                best = min(best, time.perf_counter() - t0)
        rates[use_cache] = new / best
    report('sample', f"{new} new tokens after a 16-token prompt, bfloat16, batch 1: KV cache {rates[True]:.0f} "
                     f"tokens/s, full recompute {rates[False]:.0f} tokens/s ({rates[True] / rates[False]:.1f}x)")


def section_ddp():
    common = [*SMALL, *QUIET, '--dtype=float32', '--max_iters=30', '--log_interval=1', '--compile=False']
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        la = losses(train('ddp_single', common, a))
        with open(os.path.join(args.log_dir, 'ddp_torchrun.log'), 'w') as f:
            p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                                os.path.join(ROOT, 'train.py'), *common, f'--out_dir={b}'],
                               cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if p.returncode:
            raise RuntimeError(f"torchrun exited {p.returncode}; see ddp_torchrun.log")
        text = open(os.path.join(args.log_dir, 'ddp_torchrun.log')).read()
        lb = losses(read_log(b))
    backend = 'nccl' if args.device.startswith('cuda') else 'gloo'
    report('ddp', f"torchrun --nproc_per_node=1 ({backend}): exit 0, '1 process(es)' in its log: "
                  f"{'1 process(es)' in text}; losses vs one plain process differ by up to "
                  f"{max(abs(la[k] - lb[k]) for k in la):.2e}")


if __name__ == '__main__':
    os.makedirs(args.log_dir, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'
    print(f"device: {name}, torch {torch.__version__}, python {sys.version.split()[0]}; logs in {args.log_dir}",
          flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), '--tokenizer=bpe', '--vocab_size=50257',
                    f'--dataset={DATASET}'], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    for section in args.only.split(','):
        t0 = time.time()
        try:
            globals()[f'section_{section}']()
        except Exception as e:  # the other sections still run: one GPU session should answer them all
            traceback.print_exc()
            report(section, f"FAILED: {type(e).__name__}: {e}")
        print(f"[{section}] {time.time() - t0:.0f} s", flush=True)
    print(f"\n{name}")
    for section, line in results:
        print(f"{section:8s} {line}")
