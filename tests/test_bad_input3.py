"""Bad input, part 3, in files and on stdin: model descriptions that describe no model, weights that
are not finite (our checkpoints, hf:, nanogpt:), FIFOs and devices named as input (no hang, while a
pipe handed over as /dev/fd/N still works), and text that is not UTF-8 typed into sample.py
--interactive. Harness: test_bad_input.py's."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import interop
from conftest import ROOT, TINY
from errors import Error
from model import GPT, GPTConfig
from weights import check_args, from_state, param_count
from test_bad_input import check, crafted, data, out, run_inline  # noqa: F401  (fixtures)


@contextlib.contextmanager
def deadline(seconds):
    """Fail (TimeoutError) instead of hanging: a blocked open() of a FIFO is interrupted by SIGALRM."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds}s: a hang")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


ABSURD = dict(n_layer=1024, n_head=1024, n_embd=65536)  # every size in range, 52T parameters in all
ARGS = {'n_head=3': (dict(n_head=3), 'not a multiple of n_head=3'), 'string': (dict(n_layer='2'), "n_layer='2'"),
        'null': (dict(n_embd=None), 'n_embd=None'), 'float': (dict(n_layer=2.0), 'n_layer=2.0'),
        'absurd': (ABSURD, 'GiB of memory'), 'bias': (dict(bias='yes'), "bias='yes'")}


@pytest.fixture(scope='module')
def models(reference, tmp_path_factory):
    """{name: --ckpt value}: our checkpoints, hf: directories and nanogpt: files, each a model
    description that describes no model (ARGS) or holds a non-finite weight ('nan')."""
    root = tmp_path_factory.mktemp('models')
    good = checkpoint.load(os.path.join(reference, 'latest.safetensors'))
    w = {k: good[k] for k in ('model', 'model_args', 'tokenizer')}
    nano_args = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=50304, dropout=0.0)
    nano = GPT(GPTConfig(**nano_args)).state_dict()
    nan = {k: v.clone() for k, v in w['model'].items()}
    nan['transformer.h.1.mlp.c_fc.weight'][2, 3] = float('nan')
    nan['lm_head.weight'] = nan['transformer.wte.weight']
    found = {}
    for name, (edit, _) in [*ARGS.items(), ('nan', ({}, ''))]:
        state = dict(w, model_args={**w['model_args'], **edit}, model=nan if name == 'nan' else w['model'])
        crafted(root / f'{name}.safetensors', json.dumps(checkpoint.flatten(state)[0]), checkpoint.flatten(state)[1])
        found[f'ours {name}'] = str(root / f'{name}.safetensors')
        hf = root / f'hf_{name}'
        hf.mkdir()
        interop.write_hf(str(hf), from_state(w if name != 'nan' else dict(w, model=nan)), w, 'x')
        cfg = json.loads((hf / 'config.json').read_text())
        keys = dict(n_layer='n_layer', n_head='n_head', n_embd='n_embd', bias=None)
        cfg.update({keys[k]: v for k, v in edit.items() if keys[k]})
        (hf / 'config.json').write_text(json.dumps(cfg))
        found[f'hf {name}'] = f'hf:{hf}'
        sd = {k: v.clone() for k, v in nano.items()}
        sd['transformer.ln_f.weight'][0] = float('inf') if name == 'nan' else 1.0
        torch.save({'model': sd, 'model_args': {**nano_args, **edit}}, root / f'{name}.pt')
        found[f'nanogpt {name}'] = f'nanogpt:{root / name}.pt'
    return found


@pytest.mark.xdist_group('bad_models')  # with the fixture they share: it is built once
@pytest.mark.parametrize('kind, name', [(k, n) for k in ('ours', 'hf', 'nanogpt') for n in (*ARGS, 'nan')
                                        if (k, n) != ('hf', 'bias')])  # GPT-2's config.json has no bias key
def test_models_that_are_not_models(models, out, kind, name, tmp_path):
    expect = ARGS[name][1] if name in ARGS else 'holds nan or inf'
    for script, extra in (('sample.py', []), ('evaluate.py', ['--split=', '--generate=False']),
                          ('export.py', [f'--out={tmp_path / "m.safetensors"}'])):
        t = time.time()
        with deadline(60):
            check(script, [f'--out_dir={out}', f'--ckpt={models[f"{kind} {name}"]}', *extra], expect, [out])
        assert time.time() - t < 20, 'refused before allocating'  # n_layer=1e9 once allocated until MemoryError
    assert not os.path.exists(tmp_path / 'm.safetensors')


def test_check_args_and_param_count():
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257, padded_vocab_size=320, lora_rank=4)
    assert param_count(check_args(args)) == sum(p.numel() for p in GPT(GPTConfig(**args)).parameters())
    for edit in (dict(dropout=2), dict(padded_vocab_size=100), dict(lora_rank=10 ** 30), dict(lora_targets='x')):
        with pytest.raises(Error, match='model_args'):
            check_args({**args, **edit})


@pytest.mark.xdist_group('bad_models')
def test_a_non_finite_latest_falls_back(models, out):
    """A checkpoint that checksums but holds nan is skipped by resume like any damaged one."""
    os.replace(models['ours nan'], os.path.join(out, 'latest.safetensors'))
    status, lines = run_inline('sample.py', [f'--out_dir={out}', '--max_new_tokens=2', '--num_samples=1'])
    assert status == 0 and 'holds nan or inf' in lines[0] and 'falling back' in lines[0], lines


def test_fifos_and_devices_as_input(data, out, tmp_path):
    exam = tmp_path / 'exam.jsonl'
    exam.write_text('{"question": "1+1", "choices": ["2", "3"], "answer": 0}\n')
    fifo, hf = tmp_path / 'fifo', tmp_path / 'hf'
    os.mkfifo(fifo)
    hf.mkdir()
    os.mkfifo(hf / 'config.json')
    ev = ['evaluate.py', f'--out_dir={out}', '--split=', '--generate=False']
    sample, fifo_, device = ['sample.py', f'--out_dir={out}'], 'a named pipe (FIFO)', 'a device'
    cases = [(ev, f'--mcq={fifo}', fifo_), (ev, f'--mcq={exam} --fewshot=1 --fewshot_file={fifo}', fifo_),
             (ev, '--mcq=/dev/zero', device), (ev, f'--prompts={fifo} --generate=True', fifo_), (ev, f'--text={fifo}', fifo_),
             (ev[:2], str(fifo), fifo_), (sample, f'--start=FILE:{fifo}', fifo_), (sample, '--start=FILE:/dev/zero', device),
             (sample, f'--ckpt=nanogpt:{fifo}', 'not a regular file'), (sample, f'--ckpt=hf:{hf}', fifo_),
             (['train.py', *TINY, '--dataset=tiny', f'--data_dir={data}', f'--out_dir={tmp_path / "o"}'], f'--eval_mcq={fifo}',
              fifo_)]
    for (script, *common), bad, expect in cases:
        with deadline(60):
            check(script, [*common, *bad.split()], expect, [out, data])
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'a.txt').write_text('def f(x):\n    return x\n')
    os.mkfifo(tmp_path / 'notes' / 'b.txt')
    with deadline(60):  # a folder's FIFO is skipped, as prepare.py skips it
        assert run_inline(ev[0], [*ev[1:], f'--text={tmp_path / "notes"}'])[0] == 0


def test_a_pipe_handed_over_still_works(out, tmp_path):
    """Process substitution: evaluate.py --mcq=<(cat exam) reads /dev/fd/N, a pipe with a live writer."""
    exam = tmp_path / 'exam.jsonl'
    exam.write_text('{"question": "1+1", "choices": ["2", "3"], "answer": 0}\n')
    r, w = os.pipe()
    writer = subprocess.Popen(['cat', str(exam)], stdout=w)
    os.close(w)
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), f'--out_dir={out}', '--split=',
                        '--generate=False', f'--mcq=/dev/fd/{r}'], pass_fds=(r,), capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    os.close(r)
    writer.wait(timeout=60)
    assert p.returncode == 0 and 'mcq acc' in p.stdout, p.stderr


@pytest.mark.parametrize('stdin_errors', ['strict', 'surrogateescape'])
def test_interactive_bad_lines_do_not_end_the_session(out, stdin_errors):
    lines = [b':max_new_tokens 99999999999999999999', b':num_samples 99999999999999999999', b':top_k 10000000000000000000000',
             b':max_new_tokens 20000000', b'\xff\xfe not utf-8', b'lone \xed\xa0\x80 surrogate', b'two \\', b'\xff lines',
             b':max_new_tokens 3', b'def']
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--out_dir={out}', '--interactive',
                        '--num_samples=1', '--temperature=0'], input=b'\n'.join(lines) + b'\n', capture_output=True,
                       timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONIOENCODING': f'utf-8:{stdin_errors}'})
    err = p.stderr.decode('utf-8', 'replace')
    assert p.returncode == 0 and 'Traceback' not in err, err
    assert err.count('is past the 64-bit integers') == 3 and 'max_new_tokens must be in [0, 1e7]' in err, err
    assert err.count('not valid UTF-8 text') == 3 and 'max_new_tokens=3,' in err, err
    assert '> def' in p.stdout.decode() and '-' * 40 in p.stdout.decode()  # the last prompt was answered
