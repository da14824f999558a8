"""Bad input, table-driven, per script: a non-zero exit, no traceback, at most two lines, and every
file of the dataset and of out_dir byte-identical afterwards. Scripts run in-process (runpy): any
exception other than SystemExit escaping them is exactly what would print a traceback."""
import contextlib
import io
import json
import os
import runpy
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import runs
from errors import Error, report
from conftest import ROOT, TINY, run
from test_rerun import digests


def run_inline(script, argv, env=None):
    """(exit status, stderr lines) of a script run in this process; status 'traceback' if it raised."""
    saved = sys.argv, dict(os.environ), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    sys.argv = [script, *argv]
    os.environ.update(env or {})
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
        status, message = 0, ''
    except SystemExit as e:
        status, message = (e.code if isinstance(e.code, int) else 1), ('' if isinstance(e.code, int) else str(e.code))
    except Error as e:  # what the script's sys.excepthook (errors.report) prints, exit status 1
        with contextlib.redirect_stderr(err):
            report(Error, e, None)
        status, message = 1, ''
    except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
        status, message = 'traceback', f"{type(e).__name__}: {e}"
    finally:
        runs.unlock()  # what the process's exit does for train.py run alone
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        signal.signal(signal.SIGINT, saved[2])
        signal.signal(signal.SIGTERM, saved[3])
    return status, (err.getvalue() + message).strip().splitlines()


def check(script, argv, expect, folders, env=None):
    before = {f: digests(f) for f in folders}
    status, lines = run_inline(script, argv, env)
    assert status not in (0, 'traceback'), (status, lines)
    assert 1 <= len(lines) <= 2 and expect in lines[-1], lines
    assert {f: digests(f) for f in folders} == before, "bad input changed existing files"


@pytest.fixture(scope='module')
def data(tiny_data, tmp_path_factory):
    """A private copy of the tiny dataset, plus damaged variants of it."""
    root = str(tmp_path_factory.mktemp('bad_data'))
    shutil.copytree(tiny_data, root, dirs_exist_ok=True)
    for name, damage in (('no_vocab', 'meta'), ('bad_ids', 'bin')):
        shutil.copytree(os.path.join(root, 'tiny'), os.path.join(root, name))
        if damage == 'meta':
            meta = json.load(open(os.path.join(root, name, 'meta.json')))
            meta['tokenizer']['vocab_size'] = 0
            json.dump(meta, open(os.path.join(root, name, 'meta.json'), 'w'))
        else:
            ids = np.memmap(os.path.join(root, name, 'train.bin'), dtype=np.uint16, mode='r+')
            ids[5] = 300  # the byte tokenizer has 257 ids
            ids.flush()
    return root


@pytest.fixture()
def out(reference, tmp_path):
    """A copy of a finished run to point the scripts at."""
    shutil.copytree(reference, tmp_path / 'run')
    return str(tmp_path / 'run')


TRAIN = [('--batch_size=0', 'batch_size must be in [1, inf)'), ('--block_size=0', 'block_size must be in'),
         ('--n_head=3', 'multiple of n_head=3'), ('--gradient_accumulation_steps=0', 'gradient_accumulation_steps'),
         ('--dropout=2', 'dropout must be in [0, 1)'), ('--n_embd=0', 'n_embd must be in'),
         ('--learning_rate=-1', 'learning_rate must be in (0, inf)'), ('--learning_rate=1e999', 'got inf'),
         ('--eval_interval=0', 'eval_interval'), ('--log_interval=0', 'log_interval'), ('--seed=-1', 'seed must'),
         ('--grad_clip=-1', 'grad_clip must be in [0, inf)'), ('--eval_iters=0', 'eval_iters must be in [1, inf)'),
         ('--ckpt_interval=-1', 'ckpt_interval'), ('--max_iters=-5', 'max_iters'), ('--beta2=1.5', 'beta2'),
         ('--min_lr=nan', 'min_lr'), ('--keep_last=-1', 'keep_last'), ('--device=tpu', 'available: cpu'),
         ('--device=cuda:7', 'available: cpu'), ('--dtype=float64', 'dtype must be'), ('--out_dir=', 'out_dir is empty'),
         ('--dataset=no_vocab', 'no usable tokenizer record'), ('--dataset=missing', 'not found'),
         ('--init_from=scratch', 'holds a run'), ('--init_from=step_0000003', 'not found'),
         ('--overwrite=True --init_from=resume', 'choose one'), ('--learnig_rate=1', "did you mean 'learning_rate'")]


@pytest.mark.parametrize('bad, expect', TRAIN)
def test_train(data, out, bad, expect):
    check('train.py', [*TINY, '--dataset=tiny', f'--data_dir={data}', f'--out_dir={out}', *bad.split()],
          expect, [data, out])


def test_train_paths_and_damaged_data(data, out, tmp_path):
    common = [*TINY, '--dataset=tiny', f'--data_dir={data}']
    a_file = tmp_path / 'file'
    a_file.write_text('not a folder')
    check('train.py', [*common, f'--out_dir={a_file}'], 'is a file, not a folder', [data, out])
    check('train.py', [*common, '--out_dir=/proc/sturdygpt'], 'cannot write to out_dir', [data])
    check('train.py', [*TINY, '--dataset=tiny', f'--data_dir={a_file}', f'--out_dir={tmp_path / "o"}'],
          'is a file, not a folder', [data])
    check('train.py', [*TINY, '--dataset=bad_ids', f'--data_dir={data}', f'--out_dir={tmp_path / "o2"}',
                       '--max_iters=200'], 'holds token id 300', [data])
    check('train.py', [*common, f'--out_dir={tmp_path / "o3"}', '--wandb_log=True'], 'WANDB_MODE=offline',
          [data], env={'WANDB_MODE': '', 'WANDB_API_KEY': '', 'WANDB_DIR': str(tmp_path)})


def test_non_finite_loss_stops_before_saving(data, out):
    ckpts = lambda: {n: d for n, d in digests(out).items() if n.endswith('.safetensors')}
    before = ckpts()
    check('train.py', [*TINY, '--dataset=tiny', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=60',
                       '--learning_rate=1e30', '--grad_clip=0', '--ckpt_interval=4', '--eval_interval=4'],
          'the training loss is', [data])  # resumed at 30: the loss explodes at 32, before the save at 34
    assert ckpts() == before  # latest, best and the rest are the last good ones
    losses = [json.loads(line).get('loss') for line in open(os.path.join(out, 'log.jsonl'))]
    assert all(v is None or np.isfinite(v) for v in losses)


SAMPLE = [('--top_p=0', 'top_p must be in (0, 1]'), ('--top_p=2', 'top_p'), ('--top_k=0', 'top_k'),
          ('--temperature=-1', 'temperature'), ('--max_new_tokens=-1', 'max_new_tokens'),
          ('--num_samples=0', 'num_samples'), ('--device=tpu', 'available: cpu'),
          ('--start=\udcff\udcfe', 'not valid UTF-8'), ('--start=FILE:/nonexistent', 'cannot read prompt file'),
          ('--ckpt=step_0000001', 'not found'), ('--ckpt=nanogpt:/nonexistent.pt', 'nonexistent')]


@pytest.mark.parametrize('bad, expect', SAMPLE)
def test_sample(out, bad, expect):
    check('sample.py', [f'--out_dir={out}', bad], expect, [out])


def test_sample_prompt_file_not_utf8(out, tmp_path):
    (tmp_path / 'p.txt').write_bytes(b'def \xff\xfe f():')
    check('sample.py', [f'--out_dir={out}', f'--start=FILE:{tmp_path / "p.txt"}'], 'not UTF-8 text', [out])


def test_prepare(data, tmp_path):
    corpus, fifo = tmp_path / 'corpus', tmp_path / 'fifo'
    corpus.mkdir()
    for i in range(5):
        (corpus / f'{i}.py').write_text(f"x = {i}\n" * 50)
    os.mkfifo(fifo)
    p = [f'--data_dir={data}', '--tokenizer=byte', '--min_split_tokens=10']
    for bad, expect in ((f'--input={corpus} --bpe_train_bytes=-1 --tokenizer=bpe', 'bpe_train_bytes=-1 must be'),
                        (f'--input={corpus} --min_split_tokens=0', 'min_split_tokens=0 must be'),
                        (f'--input={corpus} --val_fraction=1.5', 'val_fraction'),
                        (f'--input={corpus} --tokenizer=bpe --vocab_size=100', 'vocab_size=100'),
                        (f'--input={fifo}', 'not a regular file'), (f'--input={data}/tiny', 'inside the prepared dataset'),
                        (f'--input={data}/tiny/meta.json', 'inside the prepared dataset'),
                        (f'--input={data} --dataset=x', 'contains the output folder'),
                        (f'--input={corpus} --data_dir={fifo}', 'is a file, not a folder'),
                        (f'--input={corpus} --extend_vocab=0', 'extend_vocab'), (f'--input={corpus} --max_docs=0', 'max_docs')):
        check('prepare.py', [*p, *bad.split()], expect, [data, str(corpus)])


def crafted(path, state_json, tensors):
    """A file that checksums and frames correctly but holds the given state tree."""
    from safetensors.torch import save_file
    meta = dict(format=checkpoint.FORMAT, info=json.dumps({'iter_num': 30}), state=state_json)
    meta['checksum'] = checkpoint.digest(meta, tensors)
    save_file(tensors, str(path), metadata={'sturdygpt': json.dumps(meta)})


def test_nonsense_checkpoints_fall_back(data, reference, tmp_path):
    """Files that checksum but hold nonsense are skipped like truncated ones, by resume, --list and
    sample: five kinds of nonsense, one per file, passed over one after the other."""
    good = checkpoint.load(os.path.join(reference, 'latest.safetensors'))
    tree, tensors = checkpoint.flatten(good)
    nonsense = {  # file: state, in the order resume tries them (crafted files claim iteration 30)
        'latest': json.dumps({k: v for k, v in tree.items() if k != 'model_args'}),
        'latest_backup': json.dumps([1, 2]),
        'step_0000028': json.dumps(dict(tree, model_args={**good['model_args'], 'n_embd': 48})),
        'step_0000024': '[' * 100000 + ']' * 100000,
        'step_0000020': json.dumps(dict(tree, config={**good['config'], 'batch_size': '8'}))}
    out = str(tmp_path / 'out')
    shutil.copytree(reference, out)
    now = time.time()
    for age, (name, state) in enumerate(nonsense.items()):  # of equal iterations, the newest first
        crafted(os.path.join(out, f'{name}.safetensors'), state, tensors)
        os.utime(os.path.join(out, f'{name}.safetensors'), (now - age, now - age))
    listed = run('train.py', f'--out_dir={out}', '--list').stdout.splitlines()
    for name in nonsense:
        line = next(l for l in listed if l.startswith(name + ' '))
        assert 'BAD' in line, (name, listed)
    # sample.py reads no training config: the last of them (config types) serves it fine
    r = run('sample.py', f'--out_dir={out}', '--max_new_tokens=5', '--num_samples=1')
    skipped = [l for l in r.stderr.splitlines() if 'falling back' in l]
    assert [l.split('.safetensors')[0].split()[-1] for l in skipped] == list(nonsense)[:4], r.stderr
    # cosine: a longer wsd run would continue from where its decay began (step_), not a fallback
    r = run('train.py', *TINY, '--dataset=tiny', f'--data_dir={data}', f'--out_dir={out}',
            '--max_iters=31', '--lr_schedule=cosine')
    skipped = [l for l in r.stderr.splitlines() if 'falling back' in l]
    assert [l.split('.safetensors')[0].split()[-1] for l in skipped] == list(nonsense), r.stderr
    resumed = next(l for l in r.stdout.splitlines() if l.startswith('resumed from'))
    assert not any(f'/{name}.safetensors' in resumed for name in nonsense), resumed
