"""Training on question/answer data: the loss on what is flagged (prompts never trained), mixtures
with replay and watched datasets, exact resume after kill -9 and SIGTERM (LoRA), DDP, bad input."""
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
from conftest import ROOT, TINY, make_corpus, read_log, run
from model import GPT, GPTConfig
from test_bad_input import check
from test_ddp import torchrun
from test_qa_data import CHATS, PAIRS, write_jsonl
from test_train import wait_for_iter

QA = [*TINY, '--block_size=64', '--batch_size=8', '--eval_interval=10', '--log_interval=1']


@pytest.fixture(scope='module')
def qa_data(tmp_path_factory):
    """data_dir holding, all with the byte tokenizer: qa (pairs), chat (conversations), plain
    (documents), control (random prompts, one answer); and bpe (documents, another tokenizer)."""
    root = tmp_path_factory.mktemp('qa')
    rng = random.Random(0)
    control = [{'prompt': ''.join(rng.choice('abcdefghij') for _ in range(24)) + '?\n',
                'completion': ' yes'} for _ in range(300)]
    make_corpus(root / 'plain')
    inputs = {'qa': write_jsonl(root / 'qa.jsonl', PAIRS * 3), 'chat': write_jsonl(root / 'chat.jsonl', CHATS),
              'control': write_jsonl(root / 'control.jsonl', control), 'plain': root / 'plain'}
    for name, src in inputs.items():
        run('prepare.py', f'--input={src}', f'--dataset={name}', f'--data_dir={root / "data"}',
            '--tokenizer=byte', '--min_split_tokens=65', '--val_fraction=0.2')
    run('prepare.py', f'--input={root / "plain"}', '--dataset=bpe', f'--data_dir={root / "data"}',
        '--vocab_size=300', '--min_split_tokens=65', '--val_fraction=0.2')
    return str(root / 'data')


def train_losses(out):
    return {e['step']: e['loss'] for e in read_log(out) if 'loss' in e}


def test_prompts_do_not_train(qa_data, tmp_path):
    """Random prompts and one answer: the loss on the answers goes to near zero, while the loss on
    every token cannot (random letters are not predictable): the prompts are not trained."""
    flagged, every = str(tmp_path / 'flagged'), str(tmp_path / 'every')
    common = [*QA, f'--data_dir={qa_data}', '--dataset=control', '--max_iters=60', '--learning_rate=1e-2']
    r = run('train.py', *common, f'--out_dir={flagged}')
    run('train.py', *common, f'--out_dir={every}', '--loss_tokens=all')
    assert 'the loss on the flagged tokens' in r.stdout and '(on the flagged tokens)' in r.stdout
    val = [e['val_loss'] for e in read_log(flagged) if 'val_loss' in e]
    assert val[-1] < 0.05 < 1.0 < val[0], val  # ' yes' and its end-of-text, learned
    assert [e['val_loss'] for e in read_log(every) if 'val_loss' in e][-1] > 1.0


def test_a_window_with_nothing_to_train_adds_nothing():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=32))
    x = torch.randint(0, 32, (2, 8))
    _, loss = model(x, torch.full_like(x, -1))  # every target a prompt's or padding
    loss.backward()
    assert loss.item() == 0 and all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_a_mixture_resumes_exactly_after_kill9_and_logs_each_val_loss(qa_data, tmp_path):
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    argv = [*QA, f'--data_dir={qa_data}', '--dataset=qa:0.8,chat:0.2', '--eval_datasets=plain',
            '--max_iters=24', '--ckpt_interval=4', '--eval_interval=6', '--eval_iters=8']
    run('train.py', *argv, f'--out_dir={straight}')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *argv, f'--out_dir={killed}'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_iter(killed, 14, p)
    p.kill()
    p.communicate()
    r = run('train.py', *argv, f'--out_dir={killed}')
    assert 'resumed from' in r.stdout
    assert train_losses(killed) == train_losses(straight)  # every iteration, bit for bit
    a, b = (checkpoint.load(os.path.join(d, 'latest.safetensors')) for d in (killed, straight))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['data_pos'] == b['data_pos'] and len(a['data_pos']) == 2  # each dataset's position
    evals = [e for e in read_log(killed) if 'val_loss' in e]
    assert {'val_loss/qa', 'val_loss/chat', 'val_loss/plain'} <= set(evals[-1])
    summary = json.load(open(os.path.join(killed, 'summary.json')))
    assert summary['final_val_loss/plain'] == evals[-1]['val_loss/plain']
    # evaluate.py scores a mixture's first dataset
    run('evaluate.py', f'--out_dir={killed}', f'--data_dir={qa_data}', '--generate=False',
        f'--json={tmp_path / "eval.json"}')
    scored = json.load(open(tmp_path / 'eval.json'))['checkpoints'][0]['perplexity']['scored']
    assert scored.startswith(os.path.join(qa_data, 'qa') + ' val split')


def test_lora_on_flagged_data_resumes_exactly_after_sigterm(qa_data, tmp_path):
    base, straight, stopped = (str(tmp_path / n) for n in ('base', 'straight', 'stopped'))
    run('train.py', *QA, f'--data_dir={qa_data}', '--dataset=plain', '--max_iters=4', f'--out_dir={base}')
    argv = [*QA, f'--data_dir={qa_data}', '--dataset=qa', '--max_iters=16', '--lora_rank=4', '--eval_interval=1',
            f'--init_from={base}/latest.safetensors', '--reset_state=True']
    run('train.py', *argv, f'--out_dir={straight}')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *argv, f'--out_dir={stopped}'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_iter(stopped, 6, p)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    run('train.py', *argv, f'--out_dir={stopped}')
    assert train_losses(stopped) == train_losses(straight)


def test_ddp_on_a_mixture_matches_one_process(qa_data, tmp_path):
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    extra = ['--dataset=qa:0.7,chat:0.3', '--block_size=64', '--batch_size=4']
    run('train.py', *TINY, '--dataset=tiny', '--gradient_accumulation_steps=2', '--eval_interval=1',
        '--eval_iters=20', '--ckpt_interval=4', '--rolling_interval=0', '--max_iters=16',
        f'--data_dir={qa_data}', f'--out_dir={one}', *extra)
    p = torchrun(qa_data, two, *extra)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    a, b = train_losses(one), train_losses(two)  # two code paths (sums in another order): a tolerance
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a), (a, b)


def test_bad_mixtures_are_one_line(qa_data, tmp_path):
    out = str(tmp_path / 'o')
    for spec, expect in (('qa:0.8,qa:0.2', 'names qa twice'), ('qa:-1', 'positive weight'),
                         ('qa:x,chat', 'positive weight'), ('qa,bpe', 'the tokenizers of'),
                         ('qa,missing', 'missing/meta.json not found')):
        check('train.py', [*QA, f'--data_dir={qa_data}', f'--dataset={spec}', f'--out_dir={out}'], expect,
              [qa_data])
    for watch, expect in (('nowhere', 'nowhere/meta.json not found'), ('qa', 'which the run trains on'),
                          ('plain,plain', 'names plain twice')):
        check('train.py', [*QA, f'--data_dir={qa_data}', '--dataset=qa', f'--eval_datasets={watch}',
                           f'--out_dir={out}'], expect, [qa_data])
    check('train.py', [*QA, f'--data_dir={qa_data}', '--loss_tokens=some', f'--out_dir={out}'],
          "loss_tokens='some' must be one of flagged, all", [qa_data])
    assert not os.path.exists(out)
