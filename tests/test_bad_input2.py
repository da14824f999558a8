"""Bad input, part 3, on the command line: integers past what torch takes, --plot's log and path,
every output path checked before the work, damaged token ids, empty --ckpt lists. The harness is
test_bad_input.py's: a non-zero exit, no traceback, at most two lines, existing files unchanged."""
import os

import pytest

import files
from configurator import check_ranges, configure
from errors import Error
from test_bad_input import check, data, out, run_inline  # noqa: F401  (fixtures)

HUGE = 99999999999999999999  # past int64
INTS = [('sample.py', f'--max_new_tokens={HUGE}', 'past the 64-bit integers torch takes'),
        ('sample.py', '--max_new_tokens=1000000000000', 'max_new_tokens must be in [0, 1e7]'),
        ('sample.py', f'--num_samples={HUGE}', 'num_samples'), ('sample.py', f'--top_k={HUGE}', 'top_k'),
        ('sample.py', f'--seed={HUGE}', 'seed'), ('evaluate.py', f'--max_new_tokens={HUGE}', 'max_new_tokens'),
        ('evaluate.py', f'--num_samples={HUGE}', 'num_samples'), ('evaluate.py', f'--batch_size={HUGE}', 'batch_size'),
        ('evaluate.py', f'--top_k={HUGE}', 'top_k'), ('evaluate.py', f'--seed={HUGE}', 'seed'),
        ('evaluate.py', '--seed=-1', 'seed must be in [0, 9223372036854775807]'),
        ('evaluate.py', f'--stride={HUGE}', 'stride'), ('evaluate.py', f'--max_tokens={HUGE}', 'max_tokens'),
        ('evaluate.py', f'--fewshot={HUGE}', 'fewshot'), ('evaluate.py', f'--max_new_tokens=-{HUGE}', 'past the 64-bit'),
        ('evaluate.py', '--num_samples=100000000 --max_new_tokens=10000000', 'GiB of memory; lower one of them'),
        ('prepare.py', f'--vocab_size={HUGE}', 'vocab_size'), ('prepare.py', f'--max_docs={HUGE}', 'max_docs'),
        ('train.py', f'--n_layer={HUGE}', 'n_layer'), ('train.py', f'--max_iters={HUGE}', 'max_iters')]


@pytest.mark.parametrize('script, bad, expect', INTS)
def test_integers_past_torch(out, script, bad, expect):
    folder = f"--{'data_dir' if script == 'prepare.py' else 'out_dir'}={out}"
    check(script, [folder, *bad.split()], expect, [out])


def test_integers_past_torch_in_a_config_file_and_check_ranges(out, tmp_path):
    (tmp_path / 'big.py').write_text(f'max_new_tokens = {HUGE}\n')
    check('sample.py', [str(tmp_path / 'big.py'), f'--out_dir={out}'], 'past the 64-bit integers', [out])
    for value in (HUGE, 10 ** 400, -HUGE):  # 10**400 once raised OverflowError in math.isfinite
        with pytest.raises(Error, match='must be in'):
            check_ranges({'k': value}, {'k': '(-inf, inf)'})
    assert configure({'k': 1}, [f'--k={2 ** 63 - 1}'])[0]['k'] == 2 ** 63 - 1  # the largest still passes


LOGS = {'no step': '{"loss": 1.0}', 'null step': '{"step": null, "loss": 1.0}', 'string step': '{"step": "3"}',
        'bare number': '3', 'a list': '[1, 2]', 'bool step': '{"step": true, "loss": 1.0}',
        'float step': '{"step": 1.5, "loss": 1.0}', 'string loss': '{"step": 1, "loss": "x"}'}


@pytest.fixture()
def scratch(tmp_path):
    """An empty folder of the test's own (tmp_path holds the run `out` copies)."""
    (tmp_path / 'scratch').mkdir()
    return tmp_path / 'scratch'


@pytest.mark.parametrize('name', LOGS)
def test_plot_log_records(out, scratch, name):
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.write(LOGS[name] + '\n')
    n = sum(1 for _ in open(os.path.join(out, 'log.jsonl')))
    check('evaluate.py', [f'--out_dir={out}', f'--plot={scratch / "c.png"}'], f'line {n}:', [out])
    assert not os.listdir(scratch)


def test_plot_paths(out, scratch):
    (scratch / 'a_file').write_text('x')
    for bad, expect in (('c.xyz', '.xyz is not an image format'), ('curves', 'no extension'),
                        ('.', 'is a folder'), ('nope/c.png', 'does not exist'), ('a_file/c.png', 'it is a file')):
        check('evaluate.py', [f'--out_dir={out}', f'--plot={scratch / bad}'], expect, [out, str(scratch)])
    assert sorted(os.listdir(scratch.parent)).count(scratch.name + '.png') == 0  # not <folder>.png either
    status, lines = run_inline('evaluate.py', [f'--out_dir={out}', f'--plot={scratch / "c.SVG"}'])
    assert status == 0 and sorted(os.listdir(scratch)) == ['a_file', 'c.SVG'], (status, lines)
    assert (scratch / 'c.SVG').read_text().lstrip().startswith('<?xml')  # the format its extension names


def test_outputs_are_checked_before_the_work(out, scratch):
    exam = scratch / 'exam.jsonl'
    exam.write_text('{"question": "1+1", "choices": ["2", "3"], "answer": 0}\n')
    os.mkfifo(scratch / 'fifo')
    ev = [f'--out_dir={out}', '--split=', '--generate=False', f'--mcq={exam}']
    for bad, expect in ((scratch, 'is a folder'), ('/proc/e.json', 'cannot write in /proc'),
                        (exam / 'e.json', 'it is a file'), (scratch / 'no' / 'e.json', 'does not exist'),
                        (scratch / 'fifo', 'is not a regular file'), (' ', 'the name is blank')):
        status, lines = run_inline('evaluate.py', [*ev, f'--json={bad}'])
        assert status == 1 and len(lines) == 1 and expect in lines[0], lines  # one line: no model was loaded
    for bad, expect in ((['--out=/proc/m.safetensors'], 'cannot write in /proc'), ([f'--out={exam}/m'], 'it is a file'),
                        ([f'--out={scratch}/no/m.safetensors'], 'does not exist'), (['--out= '], 'the name is blank'),
                        ([f'--out={scratch}/no/hf', '--format=hf'], 'does not exist'),
                        ([f'--out={scratch}', '--format=hf'], 'not an empty directory'),
                        ([f'--out={scratch}/fifo'], 'exists')):
        check('export.py', [f'--out_dir={out}', *bad], expect, [out])
    assert not (scratch / 'no').exists() and sorted(os.listdir(scratch)) == ['exam.jsonl', 'fifo']


def test_check_output(tmp_path):
    (tmp_path / 'old.json').write_text('{}')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('x')
    (tmp_path / 'empty').mkdir()
    os.mkfifo(tmp_path / 'fifo')
    ok = [(tmp_path / 'new.json', False), (tmp_path / 'old.json', False), ('/dev/null', False),
          (tmp_path / 'empty', True), (tmp_path / 'new_dir', True)]
    for p, f in ok:
        files.check_output(p, 'x', folder=f)
    bad = [(tmp_path / 'full', False), (tmp_path / 'full', True), (tmp_path / 'fifo', False),
           (tmp_path / 'old.json', True), ('', False), (tmp_path / 'a' / 'b', False)]
    for p, f in bad:
        with pytest.raises(Error, match='^x'):
            files.check_output(p, 'x', folder=f)
    assert sorted(os.listdir(tmp_path)) == ['empty', 'fifo', 'full', 'old.json']  # the probes are gone


def test_damaged_token_ids_and_empty_lists(data, out):
    for split in ('train', 'val'):
        damaged = os.path.join(data, 'bad_ids', f'{split}.bin')
        with open(damaged, 'r+b') as f:  # id 300 (the byte tokenizer has 257) in both splits
            f.seek(10)
            f.write((300).to_bytes(2, 'little'))
        check('evaluate.py', [f'--out_dir={out}', '--generate=False', f'--data_dir={data}', '--dataset=bad_ids',
                              f'--split={split}'], 'holds token id 300 but its vocabulary has 257', [data, out])
    for bad in (',', ' , ', ',,,'):
        check('evaluate.py', [f'--out_dir={out}', f'--ckpt={bad}'], 'names no checkpoint', [out])


def test_what_a_new_user_tries(out, scratch):
    os.mkfifo(scratch / 'fifo')
    (scratch / 'empty').mkdir()
    for script, bad, expect in (('export.py', f'--format=onnx --out={scratch / "m"}', "format must be 'sturdygpt' or 'hf'"),
                                ('export.py', f'--ckpt={scratch / "empty"} --out={scratch / "m"}', 'no checkpoint in'),
                                ('sample.py', f'--start=FILE:{scratch / "empty"}', 'Is a directory'),
                                ('sample.py', f'--ckpt={scratch / "fifo"}', 'not found'),
                                ('evaluate.py', f'--mcq={scratch / "empty"}', 'Is a directory')):
        check(script, [f'--out_dir={out}', *bad.split()], expect, [out])
    assert sorted(os.listdir(scratch)) == ['empty', 'fifo'] and not os.listdir(scratch / 'empty')
