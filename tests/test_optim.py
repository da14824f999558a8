"""optimizer='adamw' | 'muon' and lr_schedule='wsd' through train.py: the optimizer split, exact resume
after SIGTERM and kill -9 with either optimizer, the other optimizer refused, DDP and float16 with
Muon, wsd's learning rate at its boundaries, a finished wsd run extended exactly, a run from before these keys."""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
from conftest import ROOT, TINY, losses, read_log, run
from model import GPT, GPTConfig
from weights import mark_trainable
from optim import Muon, configure_optimizers
from test_train import wait_for_iter

RUN = TINY + ['--dataset=tiny', '--max_iters=16', '--eval_interval=1', '--eval_iters=10', '--ckpt_interval=3',
              '--rolling_interval=0']


def start(data, out, optimizer):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *RUN, f'--data_dir={data}', f'--out_dir={out}',
                             f'--optimizer={optimizer}'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def weights(out):
    return checkpoint.load(os.path.join(out, 'latest.safetensors'))['model']


def same_weights(a, b):
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('lora, trainable', [(0, ''), (2, ''), (2, 'ln,wpe'), (2, 'new_tokens'), (2, 'all')])
@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_every_trainable_parameter_is_in_one_group(optimizer, lora, trainable):
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=80, lora_rank=lora,
                          lora_targets='attn.c_attn,mlp.c_fc', bias=not lora))
    if lora:
        mark_trainable(model, trainable, base_vocab_size=64)
    optimizers = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer)
    assert len(optimizers) == (2 if optimizer == 'muon' and (not lora or trainable == 'all') else 1)
    assert list(optimizers) == ['adamw', 'muon'][:len(optimizers)]
    grouped = [id(p) for opt in optimizers.values() for g in opt.param_groups for p in g['params']]
    trains = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grouped) == sorted(id(p) for p in trains.values())  # each exactly once, nothing frozen
    if optimizer == 'muon':  # the block matrices: Muon; embeddings, gains, biases, LoRA adapters: AdamW
        names = {id(p): n for n, p in trains.items()}
        muon = optimizers['muon'].param_groups if 'muon' in optimizers else []
        on_muon = {names[id(p)] for g in muon for p in g['params']}
        assert on_muon == {n for n, p in trains.items() if n.startswith('transformer.h.') and n.endswith('.weight')
                           and p.dim() == 2}
        assert 'muon' not in optimizers or optimizers['muon'].param_groups[0]['adjust_lr_fn'] == 'match_rms_adamw'


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons of two models' steps: on two threads under load one failed once (a
    reduction's order can follow the threads' timing), on one thread it cannot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_muon_on_a_cpu_is_torchs_update_in_float32(one_thread):
    """optim.Muon moves only the Newton-Schulz iteration to float32; in bfloat16 it is torch's step, bit for bit."""
    torch.manual_seed(0)
    models = [GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    init = {k: v.clone() for k, v in models[0].state_dict().items()}
    ours, ours32, theirs = [
        kind([p for n, p in m.named_parameters() if n.startswith('transformer.h.') and p.dim() == 2], lr=1e-2,
             adjust_lr_fn='match_rms_adamw') for kind, m in zip((Muon, Muon, torch.optim.Muon), models)]
    ours.ns_dtype = torch.bfloat16
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for m, opt in zip(models, (ours, ours32, theirs)):
            m(x, x)[1].backward()
            opt.step()
            opt.zero_grad()
    a, a32, b = (m.state_dict() for m in models)
    # exactly: with ns_dtype bfloat16 ours does torch's operations in torch's order (same inputs,
    # layouts and kernels, one thread), so any difference is a change of arithmetic, not float noise
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a32[k], b[k]) for k in a)
    for k in a:  # float32 and bfloat16 differ by bfloat16's rounding: a few % of what the weights moved
        assert (a32[k] - b[k]).abs().max() <= 0.1 * (b[k] - init[k]).abs().max()


@pytest.fixture(scope='module', params=['adamw', 'muon'])
def straight(request, tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(request.param))
    run('train.py', *RUN, f'--data_dir={tiny_data}', f'--out_dir={out}', f'--optimizer={request.param}')
    return request.param, out


@pytest.mark.xdist_group('optim_straight')  # with the fixture they share: it trains once
def test_sigterm_then_kill9_then_resume_is_exact(straight, tiny_data, tmp_path):
    optimizer, ref = straight
    out = str(tmp_path)
    p = start(tiny_data, out, optimizer)
    wait_for_iter(out, 4, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0 and max(losses(out)) < 16
    p = start(tiny_data, out, optimizer)  # the same command resumes it; then a kill -9 mid-run
    wait_for_iter(out, 10, p)
    p.kill()
    p.wait()
    assert max(losses(out)) < 16
    run('train.py', *RUN, f'--data_dir={tiny_data}', f'--out_dir={out}', f'--optimizer={optimizer}')
    assert losses(out) == losses(ref) and same_weights(out, ref)
    state = checkpoint.load(os.path.join(out, 'latest.safetensors'))
    assert list(state['optimizers']) == ['adamw', 'muon'][:1 + (optimizer == 'muon')]  # by name


@pytest.mark.xdist_group('optim_straight')
def test_the_other_optimizer_is_refused(straight, tiny_data):
    optimizer, ref = straight
    other = {'adamw': 'muon', 'muon': 'adamw'}[optimizer]
    r = run('train.py', *RUN, f'--data_dir={tiny_data}', f'--out_dir={ref}', '--max_iters=20', f'--optimizer={other}',
            check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert f'trained with optimizer={optimizer}' in r.stderr and '--reset_state=True' in r.stderr


def test_float16_with_muon(tiny_data, tmp_path):
    run('train.py', *RUN, f'--data_dir={tiny_data}', f'--out_dir={tmp_path}', '--optimizer=muon', '--dtype=float16',
        '--max_iters=6')
    state = checkpoint.load(os.path.join(tmp_path, 'latest.safetensors'))
    assert state['scaler']['scale'] > 0 and state['optimizers']['muon']['state']
    assert all(math.isfinite(v) for v in losses(str(tmp_path)).values())


def test_wsd_boundaries_and_extending_a_finished_run(tiny_data, tmp_path):
    wsd = [*RUN, f'--data_dir={tiny_data}', '--lr_schedule=wsd', '--warmup_iters=4', '--decay_frac=0.25',
           '--learning_rate=3e-3', '--min_lr=3e-4', '--ckpt_interval=5', '--log_interval=1', '--eval_interval=100',
           '--rolling_interval=100']
    longer, extended = str(tmp_path / 'longer'), str(tmp_path / 'extended')
    run('train.py', *wsd, f'--out_dir={longer}', '--max_iters=24')  # its decay: iterations 18 to 23
    lr = {e['step'] - 1: e['lr'] for e in read_log(longer) if 'lr' in e}  # the lr iteration `step - 1` used
    assert [lr[i] for i in range(4)] == pytest.approx([3e-3 * (i + 1) / 5 for i in range(4)])
    assert all(lr[i] == 3e-3 for i in range(4, 19))  # constant, then the decay starts at 3e-3 ...
    assert lr[19] == pytest.approx(3e-4 + (1 - math.sqrt(1 / 6)) * 2.7e-3)  # ... 1-sqrt ...
    assert lr[23] == pytest.approx(3e-4 + (1 - math.sqrt(5 / 6)) * 2.7e-3) and lr[23] > 3e-4  # ... towards min_lr
    run('train.py', *wsd, f'--out_dir={extended}', '--max_iters=16')  # finished: decayed from iteration 12
    assert os.path.exists(os.path.join(extended, 'step_0000012.safetensors'))  # saved where the decay began
    r = run('train.py', *wsd, f'--out_dir={extended}', '--max_iters=24')  # the same command, more iterations
    assert 'extending a run whose decay began at iter 12' in r.stdout
    assert losses(extended) == losses(longer) and same_weights(extended, longer)


def test_a_run_from_before_the_optimizer_key_resumes_with_adamw(tiny_data, tmp_path):
    """The defaults are Muon and wsd now; a run saved before those keys existed trained with AdamW and cosine."""
    out = str(tmp_path)
    run('train.py', *RUN, f'--data_dir={tiny_data}', f'--out_dir={out}', '--optimizer=adamw', '--lr_schedule=cosine',
        '--max_iters=6')
    state = checkpoint.load(os.path.join(out, 'latest.safetensors'))
    for key in ('optimizer', 'lr_schedule', 'decay_frac'):
        del state['config'][key]
    state['optimizer'] = state.pop('optimizers')['adamw']  # the layout before optimizers had names
    for name in os.listdir(out):
        if name.endswith('.safetensors'):
            os.remove(os.path.join(out, name))
    checkpoint.save_tiers(out, state, ['latest'])
    r = run('train.py', *RUN, f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=9')
    assert 'resumed from' in r.stdout
    state = checkpoint.load(os.path.join(out, 'latest.safetensors'))
    assert state['iter_num'] == 9 and list(state['optimizers']) == ['adamw'] and 'optimizer' not in state
    assert state['config']['optimizer'] == 'adamw' and state['config']['lr_schedule'] == 'cosine'
