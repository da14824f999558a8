"""The CUDA path at tiny size: bfloat16 training with and without compile, float16 + GradScaler
saved and restored, fused AdamW kept across a CPU -> GPU resume, SIGTERM and resume, KV-cache
generation, sampling, and torchrun with nccl. Skipped (and reported as skipped) without a GPU."""
import copy
import os
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import hardware
from conftest import ROOT, TINY, read_log, run
from model import GPT, GPTConfig
from test_train import wait_for_iter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
GPU = [*TINY, '--dataset=tiny', '--device=cuda', '--eval_interval=10', '--eval_iters=4']


def losses(out):
    return {e['step']: e['loss'] for e in read_log(out) if 'loss' in e}


def test_auto_device_dtype_and_peak():
    device, dtype = hardware.resolve('auto', 'auto')
    assert device == f'cuda:{torch.cuda.current_device()}'
    native_bf16 = torch.cuda.get_device_capability()[0] >= 8
    assert dtype == ('bfloat16' if native_bf16 else 'float16')
    print(torch.cuda.get_device_name(), dtype, hardware.peak_flops(device, dtype))


@pytest.mark.parametrize('compile', [False, True])
def test_bfloat16_training(tiny_data, tmp_path, compile):
    out = str(tmp_path)
    r = run('train.py', *GPU, f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=40',
            '--dtype=bfloat16', f'--compile={compile}', env={'TORCH_LOGS': 'recompiles'})
    log = read_log(out)
    train = [e for e in log if 'loss' in e]
    assert train[-1]['loss'] < train[0]['loss'] - 1.0
    assert train[0]['ms_per_iter'] is None  # the first iteration (compilation) is not timed
    assert all(e['peak_mem_gib'] > 0 for e in train)
    if hardware.peak_flops(hardware.resolve('cuda', 'bfloat16')[0], 'bfloat16'):
        assert all(0 < e['mfu'] < 100 for e in train[1:])
    # whole eval batches: the eval never recompiles for a new batch shape
    assert 'size mismatch' not in r.stderr, r.stderr[-2000:]


def test_float16_gradscaler_state_is_saved_and_restored(tiny_data, tmp_path):
    common = [*GPU, f'--data_dir={tiny_data}', '--dtype=float16', '--lr_decay_iters=40', '--ckpt_interval=10']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    run('train.py', *common, f'--out_dir={straight}', '--max_iters=40')
    run('train.py', *common, f'--out_dir={split}', '--max_iters=20')
    run('train.py', *common, f'--out_dir={split}', '--max_iters=40', '--init_from=resume')
    a = checkpoint.load(os.path.join(straight, 'latest.safetensors'))
    b = checkpoint.load(os.path.join(split, 'latest.safetensors'))
    assert a['scaler'] and a['scaler'] == b['scaler']  # scale and growth tracker continued, not reset
    la, lb = losses(straight), losses(split)
    assert all(v == v for v in la.values()) and la[40] < la[1]
    assert la.keys() == lb.keys() and max(abs(la[k] - lb[k]) for k in la) < 0.05


def test_a_cpu_checkpoint_resumes_with_fused_adamw(tiny_data, tmp_path):
    out = str(tmp_path)
    run('train.py', *TINY, '--dataset=tiny', '--device=cpu', f'--data_dir={tiny_data}', f'--out_dir={out}',
        '--max_iters=4')
    assert not checkpoint.load(os.path.join(out, 'latest.safetensors'))['optimizers']['adamw']['param_groups'][0]['fused']
    run('train.py', *GPU, f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=8', '--init_from=resume',
        '--dtype=float16')
    state = checkpoint.load(os.path.join(out, 'latest.safetensors'))
    assert state['iter_num'] == 8 and state['optimizers']['adamw']['param_groups'][0]['fused'] is True


def test_sigterm_then_resume(tiny_data, tmp_path):
    common = [*GPU, f'--data_dir={tiny_data}', '--max_iters=60', '--ckpt_interval=5', '--eval_interval=1',
              '--eval_iters=20']
    straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
    run('train.py', *common, f'--out_dir={straight}')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *common, f'--out_dir={stopped}'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_iter(stopped, 10, p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and 'stopped by SIGTERM' in stdout, stderr
    run('train.py', *common, f'--out_dir={stopped}', '--init_from=resume')
    a, b = losses(straight), losses(stopped)
    assert a.keys() == b.keys()
    diff = max(abs(a[k] - b[k]) for k in a)
    print(f"largest loss difference, resumed vs uninterrupted on CUDA: {diff:.2e}")
    assert diff < 1e-2


def test_kv_cache_generation_on_cuda():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=257,
                          padded_vocab_size=320)).cuda().eval()
    prompt = torch.randint(0, 257, (2, 5), device='cuda')
    # greedy tokens of two code paths, exactly: in float64, where their logits differ by ~1e-16 and
    # no top two are that close (in float32, ~1e-6: a near-tie would pick differently on some GPU)
    double = copy.deepcopy(model).double()
    cached, full = (double.generate(prompt, 80, temperature=0, use_cache=c) for c in (True, False))
    assert torch.equal(cached, full) and cached.max() < 257
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = model.generate(prompt, 80, temperature=1.0, generator=torch.Generator('cuda').manual_seed(0))
    assert out.shape == (2, 85) and out.max() < 257


def test_sample_on_cuda(tiny_data, tmp_path):
    out = str(tmp_path)
    run('train.py', *GPU, f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=10')
    a = run('sample.py', f'--out_dir={out}', '--start=def f', '--max_new_tokens=30', '--device=cuda')
    b = run('sample.py', f'--out_dir={out}', '--start=def f', '--max_new_tokens=30', '--device=cuda')
    assert a.stdout == b.stdout and a.stdout.startswith('def f')


def test_torchrun_nccl_matches_one_process(tiny_data, tmp_path):
    common = [*GPU, f'--data_dir={tiny_data}', '--max_iters=12', '--dtype=float32']
    one, ddp = str(tmp_path / 'one'), str(tmp_path / 'ddp')
    run('train.py', *common, f'--out_dir={one}')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                        os.path.join(ROOT, 'train.py'), *common, f'--out_dir={ddp}'],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '1 process(es)' in p.stdout
    a, b = losses(one), losses(ddp)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-3


def test_no_host_reads_between_log_lines_on_the_gpu(tiny_data, tmp_path):
    from test_gpu_path import COUNT_READS
    import json
    (tmp_path / 'count.py').write_text(COUNT_READS)
    counts = tmp_path / 'reads.json'
    p = subprocess.run([sys.executable, str(tmp_path / 'count.py'), str(counts), os.path.join(ROOT, 'train.py'),
                        *GPU, f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "out"}', '--max_iters=24',
                        '--log_interval=8', '--eval_interval=1000', '--ckpt_interval=0', '--rolling_interval=0',
                        '--save_best=False', '--save_epochs=False'],
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT})
    assert p.returncode == 0, p.stderr
    reads = {int(k): v for k, v in json.load(open(counts)).items()}
    assert all(reads.get(it, 0) == 0 for it in range(1, 24) if it % 8), reads


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason='float8 needs compute capability 8.9+')
def test_fp8_training_continues_without_it(tiny_data, tmp_path):
    pytest.importorskip('torchao')
    out = str(tmp_path)
    common = [*GPU, f'--data_dir={tiny_data}', f'--out_dir={out}', '--dtype=bfloat16', '--n_embd=64']
    run('train.py', *common, '--max_iters=20', '--fp8=True')
    first = losses(out)
    assert all(v == v for v in first.values()) and first[20] < first[1]
    r = run('train.py', *common, '--max_iters=30', '--fp8=False')  # the same checkpoint, without float8
    assert 'resumed from' in r.stdout and max(losses(out)) == 30
