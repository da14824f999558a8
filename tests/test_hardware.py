"""What a GPU run depends on, tested where a CPU can test it: the peak table's name matching,
device / dtype resolution, the CPU peak cache, vocabulary padding, optimizer flags and GradScaler
state across a resume, and the epoch tier's floor and disk estimate."""
import os

import pytest
import torch

import checkpoint
import hardware
import runs
from conftest import TINY, read_log, run
from model import GPT, GPTConfig, pad_vocab
from errors import Error
from optim import configure_optimizers, load_state

# real torch.cuda.get_device_name() strings -> bfloat16 dense TFLOP/s (None: MFU unknown)
NAMES = [
    ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756), ('NVIDIA H100 NVL', 835),
    ('NVIDIA H200', 989), ('NVIDIA H200 NVL', 835), ('NVIDIA GH200 480GB', 989),
    ('NVIDIA H800', 989), ('NVIDIA H800 PCIe', 756), ('NVIDIA B200', 2250), ('NVIDIA GB200', 2500),
    ('NVIDIA A100-SXM4-80GB', 312), ('NVIDIA A100-PCIE-40GB', 312), ('NVIDIA A100 80GB PCIe', 312),
    ('NVIDIA A800-SXM4-80GB', 312), ('NVIDIA A40', 149.7), ('NVIDIA L40S', 362), ('NVIDIA L40', 181),
    ('NVIDIA L4', 121), ('NVIDIA A10G', 70), ('NVIDIA A10', 125), ('NVIDIA RTX A6000', 155),
    ('NVIDIA RTX 6000 Ada Generation', 364), ('NVIDIA GeForce RTX 4090', 165.2),
    ('NVIDIA GeForce RTX 5090', 209.5), ('NVIDIA GeForce RTX 3090', 71), ('NVIDIA GeForce RTX 3090 Ti', 80),
    # substring hazards, laptop parts, MIG slices and unknown cards: unknown, never a wrong number
    ('NVIDIA RTX A1000', None), ('NVIDIA T400 4GB', None), ('NVIDIA RTX A4000', None),
    ('NVIDIA GeForce RTX 4090 Laptop GPU', None), ('NVIDIA GeForce RTX 3080 Ti Laptop GPU', None),
    ('NVIDIA A100-SXM4-40GB MIG 1g.5gb', None), ('NVIDIA H100 80GB HBM3 MIG 3g.40gb', None),
    ('Quadro RTX 6000', None), ('NVIDIA GeForce GTX 1080 Ti', None),
]


@pytest.mark.parametrize('name, tflops', NAMES)
def test_gpu_peak_names(name, tflops):
    assert hardware.gpu_peak_tflops(name, 'bfloat16') == tflops


def test_old_gpus_have_no_bfloat16_peak_but_float16():
    assert hardware.gpu_peak_tflops('Tesla V100-SXM2-16GB', 'float16') == 125
    assert hardware.gpu_peak_tflops('Tesla V100-PCIE-32GB', 'float16') == 112
    assert hardware.gpu_peak_tflops('Tesla V100S-PCIE-32GB', 'float16') == 130
    assert hardware.gpu_peak_tflops('Tesla T4', 'float16') == 65
    assert hardware.gpu_peak_tflops('Tesla T4', 'bfloat16') is None


def test_resolve_refuses_devices_that_are_not_there():
    assert hardware.resolve('cpu', 'auto') == ('cpu', 'float32')
    bad = ['tpu', 'cpu:3', 'mps:0', f'cuda:{torch.cuda.device_count()}']
    if not torch.cuda.is_available():
        bad.append('cuda')
    for device in bad:
        with pytest.raises(Error, match='available: cpu'):
            hardware.resolve(device, 'auto')
    with pytest.raises(Error, match='dtype must be'):
        hardware.resolve('cpu', 'float64')


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, 'measure_cpu_flops', lambda: calls.append(1) or 123e9)
    assert hardware.cpu_peak_flops() == 123e9 and hardware.cpu_peak_flops() == 123e9 and len(calls) == 1
    monkeypatch.setattr(hardware, 'measure_cpu_flops', lambda: 100e9)
    assert hardware.cpu_peak_flops(measure=True) == 123e9  # a lower reading never replaces the best
    assert os.path.exists(tmp_path / 'sturdygpt' / 'cpu_peak.json')


def test_padded_vocabulary_is_exact_and_never_sampled():
    torch.manual_seed(0)
    padded = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=257,
                           padded_vocab_size=pad_vocab(257)))
    assert pad_vocab(257) == 320 and pad_vocab(50257) == 50304 and pad_vocab(8192) == 8192
    assert padded.transformer.wte.weight.shape == (320, 32)
    assert torch.all(padded.transformer.wte.weight[257:] == 0)
    plain = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=257))
    plain.load_state_dict({k: v[:257] if k.endswith(('wte.weight', 'lm_head.weight')) else v
                           for k, v in padded.state_dict().items()})
    x = torch.randint(0, 257, (3, 16))
    (lp, loss_p), (lu, loss_u) = padded(x, x), plain(x, x)
    assert lp.shape == lu.shape == (3, 16, 257)
    # another head shape (320 columns, then 257): a kernel may sum in another order, so within 1e-6
    assert torch.allclose(lp, lu, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    assert padded.num_params() == plain.num_params()
    # padding rows that somehow held huge weights still could not be sampled: their logits are cut
    with torch.no_grad():
        padded.transformer.wte.weight[257:] = 100.0
    padded.eval()
    out = padded.generate(x[:, :4], 30, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.max() < 257
    # and a training step leaves zero padding rows at zero (no input uses them, no gradient reaches them)
    with torch.no_grad():
        padded.transformer.wte.weight[257:] = 0.0
    padded.train()
    opt = configure_optimizers(padded, 0.1, 1e-2, (0.9, 0.99), 'cpu')['adamw']
    for _ in range(3):
        padded(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    assert torch.all(padded.transformer.wte.weight[257:] == 0)


def test_optimizer_flags_survive_loading():
    model = torch.nn.Linear(4, 4)
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.randn(2, 4)).sum().backward()
    fused.step()
    plain = torch.optim.AdamW(model.parameters())
    load_state(plain, fused.state_dict())
    assert not plain.param_groups[0]['fused'] and plain.state[model.weight]['step'] == 1
    again = torch.optim.AdamW(model.parameters(), fused=True)
    load_state(again, plain.state_dict())  # torch's own load would keep fused=None here
    assert again.param_groups[0]['fused'] is True
    assert torch.equal(again.state[model.weight]['exp_avg'], fused.state[model.weight]['exp_avg'])


def test_float16_resume_from_a_float32_checkpoint(tiny_data, tmp_path):
    """GradScaler.load_state_dict({}) raised: a float32 / bfloat16 run saves an empty scaler state."""
    out = str(tmp_path)
    run('train.py', *TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=4')
    r = run('train.py', *TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={out}',
            '--init_from=resume', '--max_iters=8', '--dtype=float16')
    assert 'dtype float16' in r.stdout
    state = checkpoint.load(os.path.join(out, 'latest.safetensors'))
    assert state['iter_num'] == 8 and state['scaler']['scale'] > 0  # the float16 run's scaler is saved
    losses = [e['loss'] for e in read_log(out) if 'loss' in e]
    assert len(losses) == 8 and all(l == l and l < 10 for l in losses)


def test_epoch_checkpoints_have_a_floor_and_a_cap(tiny_data, tmp_path):
    # the tiny corpus is a few iterations per epoch: without the floor every one of them saved
    out = str(tmp_path)
    r = run('train.py', *TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=60',
            '--batch_size=16', '--rolling_interval=20', '--keep_last=1', '--keep_epochs=2', '--ckpt_interval=0',
            '--eval_interval=1000')
    epochs = sorted(n for n in os.listdir(out) if n.startswith('epoch_'))
    iters = [checkpoint.read_info(os.path.join(out, n))['iter_num'] for n in epochs]
    assert len(epochs) == 2 and iters[1] - iters[0] >= 20, (epochs, iters, r.stdout)
    assert r.stdout.count('epoch_') <= 3  # at most one per 20 of the 60 iterations


def test_disk_estimate(tmp_path, capsys):
    # train.py's tiers: {tier: (every so many iterations, files kept)}
    files = runs.files_kept(60000, {'latest': (True, 2), 'best': (True, 1), 'step': (1000, 5),
                                    'epoch': (3.2 * 313, 3)})
    assert files == 2 + 1 + 5 + 3
    assert runs.files_kept(100, {'latest': (True, 2), 'best': (False, 1), 'step': (0, 10),
                                 'epoch': (10, 0)}) == 2 + 10
    runs.prepare_out_dir(str(tmp_path / 'new'), new_run=True, file_bytes=1000, files=5)
    assert capsys.readouterr().err == ''
    with pytest.raises(Error, match='^cannot save'):
        runs.prepare_out_dir(str(tmp_path), new_run=False, file_bytes=2**60, files=5)
    free = __import__('shutil').disk_usage(tmp_path).free
    runs.prepare_out_dir(str(tmp_path), new_run=False, file_bytes=free // 10, files=20)
    assert 'lower keep_last' in capsys.readouterr().err
