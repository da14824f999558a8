"""
Every GPU figure sturdygpt wants, from one run on one H200 or H100 that ends within --budget_s
(default 540 s):

    python bench/bench_gpu.py --out=out-bench-gpu      # every section; its JSON and log go there
    python bench/bench_gpu.py --only=train_compiled,train_eager --batch_size=16
    python bench/bench_gpu.py --small --device=cpu     # every section on a tiny model: checks this script

The sections (SECTIONS below, most valuable first) run one after the other, after ~20 s of setup: the
measured peaks (best bf16 matmul rate on random data, device-to-device copy) and the data, the stdlib
corpus with a 50257-token BPE (GPT-2's vocabulary size) prepared once as data/stdlib_bpe50k (--small:
bytes of 200 stdlib files). Before each, a section that would not end inside --budget_s by its
estimate is skipped ("skipped: budget"); a run still going at its section's limit is killed. Each
section's figures go, as soon as it ends, to OUT/bench_gpu.json (rewritten whole: tmp + rename), and
every train.py / torchrun / prepare.py run's output to OUT/bench_gpu.log under a header line (a run
writes to OUT/NAME.running.log until it ends): at most 6 files under --out (default: a new
temporary folder, named in the device line). The table printed last is ready for docs/gpu.md, which
lists every figure and the JSON's layout.

fp8 needs torchao: installed, or a wheel in .whl/ at the repository's root (docs/gpu.md: for a
machine without network), which is unpacked here; without either the section says so and is
skipped. --small runs everything eager, in float32 on a CPU.
"""
import argparse
import functools
import glob
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from contextlib import nullcontext
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import configurator  # noqa: E402
import dataset as ds  # noqa: E402
import hardware  # noqa: E402
from errors import Error  # noqa: E402
from model import GPT, GPTConfig, pad_vocab  # noqa: E402

# name: (seconds ESTIMATED for one H200 from the work each does, none measured yet; seconds measured
# with --small on the 2-core development CPU under other load, muon's estimated), in order
SECTIONS = {
    'train_compiled': (100, 7),  # GPT-2 small (config/slm.py) through train.py, bf16, compiled: tokens/s, MFU, memory
    'train_eager': (35, 5),  # the same, eager
    'sample': (15, 1),  # KV-cache generation against recomputing the full context, GPT-2 small, batch 1
    'ddp': (20, 12),  # torchrun --nproc_per_node=1 (nccl) against one plain process: the same losses
    'ckpt': (25, 1),  # checkpoint.Writer's blocking time per save of a GPT-2-small state (target < 0.5 s)
    'muon': (55, 7),  # optimizer=muon against adamw, GPT-2 small compiled (where train.py has the key)
    'fp8': (120, 2),  # fp8=True against bf16 at GPT-2 small, medium and XL size: in-process, blocks compiled
    'headloss': (35, 1),  # model.py's head + loss against masking the padding to -inf and a chunked one
    'pad': (10, 1),  # one eager step with the vocabulary padded to 50304 and unpadded
    'resume': (25, 23),  # two uninterrupted runs and one SIGKILL'd and resumed: what is bit-exact
    'float16': (20, 24),  # float16 + GradScaler stopped and resumed: losses finite, scaler state continued
}

ap = argparse.ArgumentParser()
ap.add_argument('--only', default=','.join(SECTIONS), help='comma-separated sections')
ap.add_argument('--device', default='cuda')
ap.add_argument('--budget_s', type=float, default=540, help='seconds for the whole run, setup included')
ap.add_argument('--out', help='folder for the JSON and the log (default: a new temporary folder)')
ap.add_argument('--batch_size', type=int, default=12, help='micro-batch of the GPT-2 small train.py runs')
ap.add_argument('--iters', type=int, default=30, help='iterations of each GPT-2 small train.py run')
ap.add_argument('--small', action='store_true', help='a tiny model, no compilation: checks this script')
args = ap.parse_args()
unknown = [s for s in args.only.split(',') if s not in SECTIONS]
if unknown or not args.only:
    ap.error(f"--only takes sections among {','.join(SECTIONS)}, got {args.only!r}")
for name in ('batch_size', 'iters'):
    if getattr(args, name) < 1:
        ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
if not 0 < args.budget_s < float('inf'):
    ap.error(f"--budget_s must be a positive number of seconds, got {args.budget_s}")
T0 = time.time()
OUT = os.path.abspath(args.out or tempfile.mkdtemp(prefix='bench_gpu_'))
JSON, LOG = os.path.join(OUT, 'bench_gpu.json'), os.path.join(OUT, 'bench_gpu.log')
CUDA = args.device.startswith('cuda')
DEVICE_TYPE = 'cuda' if CUDA else args.device.split(':')[0]
# bfloat16 on GPUs; float32 on a CPU, which emulates bfloat16 matmuls slowly (--small checks paths there)
HALF = torch.bfloat16 if CUDA else torch.float32
DTYPE = 'bfloat16' if CUDA else 'float32'
CTX = torch.autocast(DEVICE_TYPE, dtype=HALF) if CUDA else nullcontext()
COMPILE = not args.small  # compiling on a CPU takes minutes; --small checks the eager paths
ITERS = 10 if args.small else args.iters
V = 1000 if args.small else 50257  # the vocabulary of the models built here: GPT-2's (--small: 1000)
if not CUDA:  # one thread each: the runs share a few cores, and tiny matmuls gain nothing from more
    torch.set_num_threads(1)

DATASET = 'bench_gpu_small' if args.small else 'stdlib_bpe50k'
PREPARE = ['--tokenizer=byte', '--max_docs=200'] if args.small else ['--tokenizer=bpe', '--vocab_size=50257']
COMMON = [f'--dataset={DATASET}', f'--device={args.device}', '--eval_interval=1000000', '--eval_iters=1',
          '--ckpt_interval=0', '--rolling_interval=0', '--save_best=False', '--save_epochs=False']
DIMS = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # GPT-2 small
GPT2 = ['config/slm.py', '--gradient_accumulation_steps=8', f'--batch_size={args.batch_size}']
TINY = ['config/python_code.py']  # 4x4x256, block 256: the sections that check behaviour, not speed
if args.small:
    DIMS = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
    GPT2 = TINY = ['config/python_code.py', '--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=64',
                   '--batch_size=4']
report = {'script': 'bench/bench_gpu.py', 'argv': sys.argv[1:], 'started': datetime.now(timezone.utc).isoformat(
    timespec='seconds'), 'budget_s': args.budget_s, 'device': {}, 'sections': {}}
running = []  # the runs started and not yet finished: killed if this script is stopped
limit = float('inf')  # when the current section's runs are killed


def write_json():
    report['elapsed_s'] = round(time.time() - T0, 1)
    with open(JSON + '.tmp', 'w') as f:
        json.dump(report, f, indent=1)
    os.replace(JSON + '.tmp', JSON)


def say(line):
    print(line, flush=True)
    with open(LOG, 'a') as f:
        f.write(line + '\n')


def start(name, cmd):
    """Start `python cmd...` in the repository; its output goes to OUT/name.running.log until finish()."""
    path = os.path.join(OUT, f'{name}.running.log')
    with open(path, 'w') as f:  # its own process group, so that a kill reaches torchrun's workers too
        p = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, process_group=0,
                             env={**os.environ, 'PYTHONUNBUFFERED': '1', **({} if CUDA else {'OMP_NUM_THREADS': '1'})})
    run = dict(name=name, p=p, path=path, cmd=cmd, t0=time.time())
    running.append(run)
    return run


def start_train(name, argv, out, torchrun=False):
    launcher = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1'] if torchrun else []
    cpu_peak = [] if CUDA else [f"--peak_flops={report['device']['measured_tflops'] * 1e12:.4g}"]  # not measured again
    return start(name, [*launcher, os.path.join(ROOT, 'train.py'), *argv, *cpu_peak, f'--out_dir={out}'])


def kill(run):
    try:
        os.killpg(run['p'].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run['p'].wait()


def finish(*runs, check=True):
    """Wait for runs (killed at the section's limit), append each one's output to the log under a
    header line; returns their outputs. A run that failed raises RuntimeError (check=True)."""
    texts = []
    for run in runs:
        try:
            run['p'].wait(timeout=max(1.0, limit - time.time()))
        except subprocess.TimeoutExpired:
            kill(run)
            run['timed_out'] = True
        running.remove(run)
        with open(run['path']) as f:
            texts.append(f.read())
        os.remove(run['path'])
        status = 'killed at the section limit' if run.get('timed_out') else f"exit {run['p'].returncode}"
        with open(LOG, 'a') as f:
            f.write(f"==== {run['name']}: python {' '.join(run['cmd'])} | {status} after "
                    f"{time.time() - run['t0']:.1f} s\n{texts[-1]}")
    for run in runs:
        if check and (run.get('timed_out') or run['p'].returncode):
            raise RuntimeError(f"{run['name']} {'ran past its limit' if run.get('timed_out') else 'failed'}; "
                               f"see bench_gpu.log")
    return texts


def read_log(out):
    """log.jsonl's records; a last line cut short (the process was killed mid-write) is left out."""
    path = os.path.join(out, 'log.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split('\n')
    records = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:  # only the unterminated last line may be incomplete
                raise
    return records


def losses(log):
    return {e['step']: e['loss'] for e in log if 'loss' in e}  # the last record of an iteration wins


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, warmup=2, reps=5, rounds=3):
    """Seconds per call of fn: the median over rounds of reps calls queued back to back, after warmup
    calls (the first compiles), and the spread between rounds as a fraction of it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / reps)
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median


def peak_mem(reset=False):
    """(peak allocated, peak reserved) GiB since the last reset; None on a CPU."""
    if not CUDA:
        return None, None
    if reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def build(dims, vocab_size=V, padded=True):
    """A GPT built (and initialised) on the device, seeded: the same weights every time."""
    torch.manual_seed(0)
    with torch.device(args.device):
        return GPT(GPTConfig(vocab_size=vocab_size, padded_vocab_size=pad_vocab(vocab_size) if padded else None,
                             **dims))


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=6e-4, fused=CUDA)


def train_step(model, opt, x):
    """One fwd + bwd + AdamW step on the tokens x (their own targets); returns the loss."""
    with CTX:
        _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def mfu(tokens_per_s, flops_per_token):
    """MFU in % against the datasheet's dense bf16 peak and against the one measured at the start."""
    peaks = report['device']
    return {f'mfu_{kind}_pct': round(100 * flops_per_token * tokens_per_s / (peaks[key] * 1e12), 1)
            if peaks.get(key) else None for kind, key in (('datasheet', 'datasheet_bf16_tflops'),
                                                          ('measured', 'measured_tflops'))}


def mfu_text(figures):
    d, m = figures['mfu_datasheet_pct'], figures['mfu_measured_pct']
    return f"MFU {f'{d}%' if d is not None else 'unknown'} of datasheet, {m}% of measured"


def find_torchao():
    """Why torchao cannot be imported, or None. One not installed is taken from a wheel in .whl/
    (docs/gpu.md), unpacked into a temporary folder that this process and train.py import from."""
    if importlib.util.find_spec('torchao'):
        return None
    wheels = sorted(glob.glob(os.path.join(ROOT, '.whl', 'torchao-*.whl')))
    if not wheels:
        return "torchao is not installed and there is no .whl/torchao-*.whl (docs/gpu.md says how)"
    site = tempfile.mkdtemp(prefix='torchao_')
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(site)
    sys.path.insert(0, site)
    os.environ['PYTHONPATH'] = os.pathsep.join([site] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    importlib.invalidate_caches()
    return None if importlib.util.find_spec('torchao') else f"{wheels[-1]} does not hold torchao"


def setup():
    """The device, its measured peaks (best bf16 matmul rate on random data; device-to-device copy,
    bytes read + written) and the data."""
    dev = report['device']
    dev.update(name=torch.cuda.get_device_name() if CUDA else 'cpu', torch=torch.__version__,
               python=sys.version.split()[0], cuda=torch.version.cuda, date=datetime.now().strftime('%Y-%m-%d'))
    if CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        dev.update(capability=list(torch.cuda.get_device_capability()), sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1),
                   datasheet_bf16_tflops=hardware.gpu_peak_tflops(dev['name'], 'bfloat16'))
    best = {}
    for n in ((256, 512) if args.small else (4096, 8192, 16384)):
        a, b = (torch.randn(n, n, device=args.device, dtype=HALF) for _ in range(2))
        best[n] = 2 * n ** 3 / timed(lambda: a @ b, warmup=2, reps=10, rounds=5)[0] / 1e12
    x = torch.randint(0, 256, (2**24 if args.small else 2**30,), dtype=torch.uint8, device=args.device)
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x), warmup=2, reps=10, rounds=3)[0]
    dev.update(measured_tflops=float(f'{max(best.values()):.4g}'), matmul_dtype=DTYPE,
               matmul_tflops_by_size={n: float(f'{t:.4g}') for n, t in best.items()},
               measured_copy_gb_s=float(f'{2 * x.numel() / copy_s / 1e9:.4g}'))
    say(f"device: {dev['name']}, torch {dev['torch']}, python {dev['python']}; {DTYPE} matmul "
        f"{dev['measured_tflops']} TFLOP/s measured ({dev.get('datasheet_bf16_tflops')} datasheet), copy "
        f"{dev['measured_copy_gb_s']} GB/s; out {OUT}")
    finish(start('prepare', [os.path.join(ROOT, 'prepare.py'), *PREPARE, f'--dataset={DATASET}']))


# -----------------------------------------------------------------------------
# sections: each returns {'figures': {...}, 'summary': one line}, or {'status': 'skipped: why'}

def train_speed(name, compile, extra=()):
    """A GPT-2 small run of train.py: steady tokens/s (past the first two log intervals:
    warm-up, compilation), MFU both ways, peak memory; the run's wall time, start-up and compilation in."""
    compile = compile and COMPILE
    with tempfile.TemporaryDirectory() as out:
        run = start_train(name, [*GPT2, *COMMON, f'--dtype={DTYPE}', f'--compile={compile}', f'--max_iters={ITERS}',
                           f'--log_interval={2 if args.small else 5}', *extra], out)
        finish(run)
        log = read_log(out)
    run_s = time.time() - run['t0']
    rows = [e for e in log if e.get('tokens_per_sec')]
    steady = rows[2:] or rows
    tok_s = statistics.median(e['tokens_per_sec'] for e in steady)
    ms = statistics.median(e['ms_per_iter'] for e in steady)
    vocab = ds.tokenizer_state(os.path.join(ROOT, 'data', DATASET))['vocab_size']
    cfg = configurator.script_defaults(os.path.join(ROOT, 'train.py'), GPT2)
    with torch.device('meta'):
        flops = GPT(GPTConfig(vocab_size=vocab, padded_vocab_size=pad_vocab(vocab), **{
            k: cfg[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size')})).flops_per_token()
    figures = dict(compile=compile, tokens_per_s=round(tok_s), ms_per_iter=round(ms, 1),
                   tokens_per_iter=cfg['batch_size'] * cfg['gradient_accumulation_steps'] * cfg['block_size'],
                   **mfu(tok_s, flops), peak_alloc_gib=max((e.get('peak_mem_gib') or 0) for e in log) or None,
                   peak_reserved_gib=max((e.get('peak_mem_reserved_gib') or 0) for e in log) or None,
                   run_s=round(run_s, 1), outside_iters_s=round(run_s - ITERS * ms / 1000, 1))
    mem = f", {figures['peak_alloc_gib']:.1f} GiB peak ({figures['peak_reserved_gib']:.1f} reserved)" \
        if figures['peak_alloc_gib'] else ""
    return dict(figures=figures, summary=f"{tok_s:,.0f} tokens/s, {ms:.0f} ms/iter, {mfu_text(figures)}{mem}; "
                                         f"{run_s:.0f} s for the run ({figures['outside_iters_s']:.0f} s of "
                                         f"start-up, compilation, evals, final save)")


def section_train_compiled():
    return train_speed('train_compiled', True)


def section_train_eager():
    return train_speed('train_eager', False)


def section_sample():
    model = build(DIMS).eval()
    prompt = torch.randint(0, V, (1, 16), device=args.device)
    new = 32 if args.small else 256
    rates = {}
    for use_cache in (True, False):
        def gen():
            with CTX:
                model.generate(prompt, new, use_cache=use_cache, generator=torch.Generator(args.device).manual_seed(0))
        rates[use_cache] = new / timed(gen, warmup=1, reps=1, rounds=2)[0]
    figures = dict(new_tokens=new, kv_cache_tokens_per_s=round(rates[True]), full_tokens_per_s=round(rates[False]),
                   speedup=round(rates[True] / rates[False], 2))
    return dict(figures=figures, summary=f"{new} new tokens after 16, {DTYPE}, batch 1: KV cache {rates[True]:,.0f} "
                                         f"tokens/s, full recompute {rates[False]:,.0f} ({figures['speedup']}x)")


def section_ddp():
    argv = [*TINY, *COMMON, '--dtype=float32', '--max_iters=30', '--log_interval=1', '--compile=False']
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        _, text = finish(start_train('ddp_single', argv, a), start_train('ddp_torchrun', argv, b, torchrun=True))
        la, lb = losses(read_log(a)), losses(read_log(b))
    figures = dict(backend='nccl' if CUDA else 'gloo', one_process_in_log='1 process(es)' in text,
                   same_steps=la.keys() == lb.keys(), max_loss_diff=max(abs(la[k] - lb[k]) for k in la))
    return dict(figures=figures, summary=f"torchrun --nproc_per_node=1 ({figures['backend']}) exit 0, "
                                         f"'1 process(es)' logged: {figures['one_process_in_log']}; losses vs one "
                                         f"plain process differ by up to {figures['max_loss_diff']:.2e}")


def section_ckpt():
    """checkpoint.Writer().save's blocking time for a GPT-2-small state (weights + AdamW) on the device:
    a copy queued into pinned host memory; the first save also allocates that buffer."""
    model = build(DIMS)
    opt = adamw(model)
    train_step(model, opt, torch.randint(0, V, (2, DIMS['block_size']), device=args.device))  # AdamW's moments
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'iter_num': 1}
    writer, blocked, writes = checkpoint.Writer(), [], []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(3):  # the previous write is done before each, as between train.py's saves
            blocked.append(writer.save(d, state, ['latest']))
            writes.append(writer.wait()[2])
        size = os.path.getsize(os.path.join(d, 'latest.safetensors'))
        sync_s = checkpoint.Writer(background=False).save(d, state, ['latest'])
    figures = dict(state_gib=round(size / 2**30, 2), blocked_first_s=round(blocked[0], 3),
                   blocked_s=round(statistics.median(blocked[1:]), 3), background_write_s=round(
                       statistics.median(writes), 2), sync_save_s=round(sync_s, 2))
    figures['target_met'] = figures['blocked_s'] < 0.5
    return dict(figures=figures, summary=f"{figures['state_gib']} GiB state: blocked {figures['blocked_s']} s per "
                                         f"save (first {figures['blocked_first_s']} s; target < 0.5 s: "
                                         f"{'met' if figures['target_met'] else 'MISSED'}), written in the background "
                                         f"in {figures['background_write_s']} s; a synchronous save {sync_s:.2f} s")


def section_muon():
    if 'optimizer' not in configurator.script_defaults(os.path.join(ROOT, 'train.py')):
        return dict(status='skipped: train.py has no optimizer key')
    result = train_speed('muon', True, ['--optimizer=muon'])
    adamw_tok_s = report['sections'].get('train_compiled', {}).get('figures', {}).get('tokens_per_s')
    if adamw_tok_s:
        result['figures']['vs_adamw'] = round(result['figures']['tokens_per_s'] / adamw_tok_s, 3)
        result['summary'] += f"; {result['figures']['vs_adamw']}x adamw's tokens/s (train_compiled)"
    return result


def section_fp8():
    """Float8 (torchao, hardware.convert_to_fp8) against bfloat16: fwd + bwd + fused AdamW steps in this
    process, each block compiled once for all the layers (regional compilation: seconds, where the
    whole of GPT-2 XL through train.py would take minutes); the head and loss stay eager in both. MFU
    counts model FLOPs against the bf16 peaks, as the field does. A size that does not fit the time
    left (seconds estimated for one H200) is skipped; one that fails does not stop the others."""
    why = find_torchao()
    try:
        if not why and not args.small:  # --small: the path, on a CPU
            hardware.check_fp8(args.device)
    except Error as e:
        why = str(e)
    if why:
        return dict(status=f'skipped: {why}')
    sizes = {'gpt2_small': (dict(n_layer=12, n_head=12, n_embd=768), 12, 30),  # dims, micro-batch, seconds
             'gpt2_medium': (dict(n_layer=24, n_head=16, n_embd=1024), 8, 35),
             'gpt2_xl': (dict(n_layer=48, n_head=25, n_embd=1600), 8, 55)}
    if args.small:
        sizes = {'tiny': (dict(n_layer=2, n_head=2, n_embd=64), 4, 1)}
    figures, parts = {}, []
    for name, (dims, bs, estimate) in sizes.items():
        if time.time() + estimate > T0 + args.budget_s:
            figures[name] = 'skipped: budget'
            parts.append(f"{name} skipped: budget")
            continue
        row = figures[name] = {}
        try:
            for kind in ('bf16', 'fp8'):
                torch._dynamo.reset()
                peak_mem(reset=True)
                model = build({**dims, 'block_size': DIMS['block_size']})
                if kind == 'fp8':
                    hardware.convert_to_fp8(model)
                if COMPILE:
                    for block in model.transformer.h:
                        block.compile(dynamic=False)
                x = torch.randint(0, V, (bs, DIMS['block_size']), device=args.device)
                step = functools.partial(train_step, model, adamw(model), x)
                t0 = time.time()
                row[f'{kind}_first_loss'] = step().item()
                row[f'{kind}_first_step_s'] = round(time.time() - t0, 1)  # compilation included
                s, spread = timed(step, warmup=2, reps=3 if args.small else 4)
                tok_s, mem = bs * DIMS['block_size'] / s, peak_mem()[0]
                row.update({f'{kind}_tokens_per_s': round(tok_s), f'{kind}_spread': round(spread, 3),
                            f'{kind}_peak_alloc_gib': mem and round(mem, 1),
                            **{f'{kind}_{k}': v for k, v in mfu(tok_s, model.flops_per_token()).items()}})
                del model, step
        except Exception as e:
            row['error'] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            parts.append(f"{name} failed")
            continue
        row['speedup'] = round(row['fp8_tokens_per_s'] / row['bf16_tokens_per_s'], 3)
        row['first_loss_rel_diff'] = abs(row['fp8_first_loss'] / row['bf16_first_loss'] - 1)
        parts.append(f"{name} {row['fp8_tokens_per_s']:,} vs {row['bf16_tokens_per_s']:,} tokens/s ({row['speedup']}x)")
    torch._dynamo.reset()
    peak_mem(reset=True)
    return dict(figures=figures, summary=f"fp8 vs {DTYPE}{', blocks compiled' if COMPILE else ''}: " + ", ".join(parts))


class ChunkedHeadLoss(torch.autograd.Function):
    """Head + cross-entropy in row chunks, the gradients made in the forward pass (as Liger-Kernel's
    fused linear cross-entropy): only one chunk's logits exist at a time, at no extra matmul."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk, step):
        xb, wb = x.to(HALF), weight.to(HALF)
        gx, gw = torch.empty_like(xb), torch.zeros_like(weight, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, len(targets), chunk):
            part, gx[s:s + chunk], gw_part = step(xb[s:s + chunk], wb, targets[s:s + chunk], vocab_size, len(targets))
            loss += part
            gw[:vocab_size] += gw_part
        ctx.save_for_backward(gx, gw)
        ctx.dtypes = x.dtype, weight.dtype
        return loss / len(targets)

    @staticmethod
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors
        return (gx * grad).to(ctx.dtypes[0]), (gw * grad).to(ctx.dtypes[1]), None, None, None, None


def chunk_step(x, w, t, vocab_size, n):
    """One chunk: (sum of its losses, d loss / d x, d loss / d w[:vocab_size]), for a mean over n rows."""
    logits = (x @ w.t())[:, :vocab_size].float()  # (chunk, V)
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, t[:, None])[:, 0]).sum()
    g = logits.sub_(lse[:, None]).exp_()  # softmax
    g.scatter_add_(1, t[:, None], -torch.ones_like(g[:, :1]))
    g = g.div_(n).to(x.dtype)
    return loss, g @ w[:vocab_size], (g.t() @ x).float()


def section_headloss():
    """The head + loss at GPT-2 small's shape (one micro-batch of rows, C, vocabulary 50257 padded to
    50304), forward + backward: model.py's (logits sliced to 50257 columns, a strided view, then
    F.cross_entropy) against full contiguous logits with the padding columns masked to -inf (by
    masked_fill, or by a -inf bias in the matmul) and a chunked head + loss; eager and compiled."""
    n, c = (4 if args.small else args.batch_size) * DIMS['block_size'], DIMS['n_embd']
    vp = pad_vocab(V)
    torch.manual_seed(0)
    x = torch.randn(n, c, device=args.device, requires_grad=True)
    w = torch.randn(vp, c, device=args.device) * 0.02
    w[V:] = 0  # the padding rows, as in the model
    w.requires_grad_()
    t = torch.randint(0, V, (n,), device=args.device)
    pad = torch.arange(vp, device=args.device) >= V
    neg = torch.zeros(vp, device=args.device).masked_fill(pad, float('-inf'))
    chunk = n // 6 if n % 6 == 0 else n // 4

    def sliced(x, w, t):
        return F.cross_entropy(F.linear(x, w)[:, :V], t)

    def masked(x, w, t):
        return F.cross_entropy(F.linear(x, w).masked_fill(pad, float('-inf')), t)

    def bias(x, w, t):
        return F.cross_entropy(F.linear(x, w, neg), t)

    def chunked(x, w, t, step=chunk_step):
        return ChunkedHeadLoss.apply(x, w, t, V, chunk, step)

    variants = {'slice': sliced, 'mask': masked, 'bias': bias, 'chunked': chunked}
    figures, ref = {}, None
    for mode in ('eager', 'compiled') if COMPILE else ('eager',):
        for name, fn in variants.items():
            torch._dynamo.reset()
            if name == 'chunked' and mode == 'compiled':  # the chunk's arithmetic compiled, the loop not
                fn = functools.partial(chunked, step=torch.compile(chunk_step, dynamic=False))
            elif mode == 'compiled':
                fn = torch.compile(fn, dynamic=False)

            def fwd_bwd():
                x.grad = w.grad = None
                with CTX:
                    loss = fn(x, w, t)
                loss.backward()
                return loss

            key = f'{name}_{mode}'
            try:
                loss = fwd_bwd()
                got = (loss.item(), x.grad.float(), w.grad.float())
                ref = ref or got
                base = peak_mem(reset=True)[0] and torch.cuda.memory_allocated() / 2**30
                s, spread = timed(fwd_bwd, warmup=1, reps=5)
            except Exception as e:  # a variant that does not compile is a finding, not the end of the section
                figures[key] = {'error': f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
                continue
            figures[key] = dict(ms=round(s * 1000, 2), spread=round(spread, 3),
                                peak_above_inputs_gib=base and round(peak_mem()[0] - base, 2),
                                loss_diff=abs(got[0] - ref[0]),
                                grad_x_rel_err=((got[1] - ref[1]).norm() / ref[1].norm()).item(),
                                grad_w_rel_err=((got[2] - ref[2]).norm() / ref[2].norm()).item())
    figures['matmul_floor_ms'] = round(3 * 2 * n * c * vp / (report['device']['measured_tflops'] * 1e12) * 1000, 2)
    figures.update(rows=n, chunk=chunk)
    parts = [f"{k} {v['ms']} ms" + (f" {v['peak_above_inputs_gib']} GiB" if v['peak_above_inputs_gib'] else '')
             if 'ms' in v else f"{k} failed" for k, v in figures.items() if isinstance(v, dict)]
    return dict(figures=figures, summary=f"{n} rows x {c} -> {V}: " + ", ".join(parts) +
                                         f" (3 matmuls at the measured peak: {figures['matmul_floor_ms']} ms)")


def section_pad():
    """One fwd + bwd + AdamW step of GPT-2 small (eager), the vocabulary padded or not."""
    bs = 4 if args.small else args.batch_size
    x = torch.randint(0, V, (bs, DIMS['block_size']), device=args.device)
    ms = {}
    for padded in (True, False):
        model = build(DIMS, padded=padded)
        ms[padded] = timed(functools.partial(train_step, model, adamw(model), x), warmup=3, reps=5)[0] * 1000
        del model
    figures = dict(padded_ms=round(ms[True], 1), unpadded_ms=round(ms[False], 1),
                   padded_speedup=round(ms[False] / ms[True], 3))
    return dict(figures=figures, summary=f"one step of {bs}x{DIMS['block_size']} tokens: vocabulary {pad_vocab(V)} "
                                         f"{ms[True]:.1f} ms, {V} {ms[False]:.1f} ms: padded "
                                         f"{figures['padded_speedup']}x as fast")


def section_resume():
    """Two uninterrupted runs of N iterations, and one killed with SIGKILL past iteration N / 3 and
    resumed. The run to be killed is given max_iters far past N (and the schedule N, as the others) so
    that it cannot end before the kill, however fast the device; its resumption ends at N."""
    n = 60 if args.small else 150
    common = [*TINY, *COMMON, f'--dtype={DTYPE}', f'--lr_decay_iters={n}', f'--ckpt_interval={n // 15}',
              '--log_interval=1', '--compile=False']
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as a2, \
            tempfile.TemporaryDirectory() as b:
        runs = [start_train(f'resume_straight{i}', [*common, f'--max_iters={n}'], d) for i, d in ((1, a), (2, a2))]
        killed = start_train('resume_killed', [*common, f'--max_iters={100 * n}'], b)
        while not any(e.get('step', 0) >= n // 3 for e in read_log(b)):  # read_log: the last line may be cut
            if killed['p'].poll() is not None or time.time() > limit:
                finish(killed, *runs)
                raise RuntimeError(f"the run to be killed did not reach iteration {n // 3}; see bench_gpu.log")
            time.sleep(0.02)
        kill(killed)
        killed_at = max(losses(read_log(b)))
        finish(killed, check=False)
        finish(*runs)
        finish(start_train('resume_resumed', [*common, f'--max_iters={n}'], b))
        la, la2, lb = (losses(read_log(d)) for d in (a, a2, b))
        wa, wa2, wb = (checkpoint.load(os.path.join(d, 'latest.safetensors'))['model'] for d in (a, a2, b))

    def same(x, y):
        return all(torch.equal(x[k], y[k]) for k in x)

    f = dict(killed_at=killed_at, straight_max_loss_diff=max(abs(la[k] - la2[k]) for k in la),
             straight_weights_identical=same(wa, wa2), resumed_same_steps=la.keys() == lb.keys(),
             resumed_max_loss_diff=max(abs(la[k] - lb[k]) for k in la), resumed_weights_identical=same(wa, wb))
    return dict(figures=f, summary=f"two uninterrupted runs: losses differ by up to {f['straight_max_loss_diff']:.2e}, "
                                   f"weights {'bit-identical' if f['straight_weights_identical'] else 'differ'}; "
                                   f"SIGKILL at iteration {killed_at} and resumed: losses differ by up to "
                                   f"{f['resumed_max_loss_diff']:.2e}, weights "
                                   f"{'bit-identical' if f['resumed_weights_identical'] else 'differ'}")


def section_float16():
    n = 40 if args.small else 200
    common = [*TINY, *COMMON, '--dtype=float16', f'--lr_decay_iters={n}', f'--ckpt_interval={n // 4}',
              f'--log_interval={n // 20}', '--compile=False']
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        finish(start_train('float16_straight', [*common, f'--max_iters={n}'], a),
               start_train('float16_first_half', [*common, f'--max_iters={n // 2}'], b))
        finish(start_train('float16_resumed', [*common, f'--max_iters={n}'], b))
        la, lb = losses(read_log(a)), losses(read_log(b))
        sa, sb = (checkpoint.load(os.path.join(d, 'latest.safetensors'))['scaler'] for d in (a, b))
    f = dict(first_loss=la[min(la)], last_loss=la[max(la)], all_finite=all(abs(v) < float('inf') for v in la.values()),
             scaler=sa, scaler_equal=sa == sb, same_steps=la.keys() == lb.keys(),
             max_loss_diff=max(abs(la[k] - lb[k]) for k in la))
    return dict(figures=f, summary=f"{n} steps: loss {f['first_loss']:.3f} -> {f['last_loss']:.3f}, finite: "
                                   f"{f['all_finite']}; stopped at {n // 2} and resumed: scaler state "
                                   f"{'equal' if f['scaler_equal'] else 'DIFFERENT'} ({sa}), losses differ by up to "
                                   f"{f['max_loss_diff']:.2e}")


def table():
    """The results as markdown, for docs/gpu.md."""
    dev, total = report['device'], report['elapsed_s']
    lines = [f"{dev.get('name')}, torch {dev.get('torch')}, CUDA {dev.get('cuda')}, {dev.get('date')}: "
             f"{dev.get('matmul_dtype')} matmul {dev.get('measured_tflops')} TFLOP/s measured "
             f"({dev.get('datasheet_bf16_tflops')} datasheet), copy {dev.get('measured_copy_gb_s')} GB/s; "
             f"{total:.0f} s in all (budget {args.budget_s:.0f} s)", '',
             '| section | result | s (estimate) |', '| --- | --- | --- |']
    for name, s in report['sections'].items():
        result = s['status'] if s['status'] != 'ok' else s['summary']
        lines.append(f"| {name} | {result} | {s.get('wall_s', '-')} ({s['estimate_s']}) |")
    return '\n'.join(lines)


def on_term(signum, frame):
    raise SystemExit(128 + signum)  # the runs are killed and the JSON written on the way out


if __name__ == '__main__':
    os.makedirs(OUT, exist_ok=True)
    os.chdir(ROOT)  # config files are named relative to the repository, as train.py's runs see them
    signal.signal(signal.SIGTERM, on_term)
    try:
        limit = T0 + args.budget_s
        setup()
        peak_mem(reset=True)  # the peaks' buffers go back to the device
        report['setup_s'] = round(time.time() - T0, 1)
        write_json()
        for name in (s for s in SECTIONS if s in args.only.split(',')):
            estimate = SECTIONS[name][1 if args.small else 0]
            left = T0 + args.budget_s - time.time()
            entry = report['sections'][name] = {'status': 'running', 'estimate_s': estimate}
            if estimate > left:
                entry.update(status='skipped: budget', note=f"estimated {estimate} s, {left:.0f} s left")
            else:
                say(f"[{name}] starting ({estimate} s estimated, {left:.0f} s left)")
                t0 = time.time()
                limit = min(T0 + args.budget_s, t0 + max(3 * estimate, 120))
                try:
                    entry.update({'status': 'ok', **globals()[f'section_{name}']()})
                except Exception as e:  # the other sections still run: one run should answer them all
                    with open(LOG, 'a') as f:
                        traceback.print_exc(file=f)
                    traceback.print_exc()
                    entry.update(status=f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
                entry['wall_s'] = round(time.time() - t0, 1)
                peak_mem(reset=True)
            say(f"[{name}] {entry['status'] if entry['status'] != 'ok' else entry['summary']} "
                f"({entry.get('wall_s', 0):.0f} s)")
            write_json()
    finally:  # stopped or not, the runs in flight are ended and logged, and the JSON holds the table
        for run in list(running):
            kill(run)
            finish(run, check=False)
        for entry in report['sections'].values():
            if entry['status'] == 'running':
                entry['status'] = 'failed: stopped while running'
        write_json()
        report['table'] = table()
        write_json()
        say('\n' + report['table'])
