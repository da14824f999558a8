"""evaluate.py, train.py's in-training evaluation and sample.py's new modes, end to end."""
import glob
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys

import pytest

from configurator import configure, script_keys
from errors import Error
from conftest import ROOT, read_log, run, run_on_tty

NAMES = ['Anna', 'Boris', 'Chen', 'Dara', 'Emil', 'Fatima', 'Goran', 'Hana', 'Ivan', 'Jana']
THINGS = ['apples', 'bricks', 'candles', 'drums', 'eggs', 'flutes', 'gloves', 'hats', 'inks', 'jars']
MODEL = ['--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=64', '--compile=False']

# the tests share a module fixture that trains: on one pytest-xdist worker, it trains once
pytestmark = pytest.mark.xdist_group('evaluate')


@pytest.fixture(scope='module')
def facts(tmp_path_factory):
    """A corpus of facts ('Question: What does Anna keep?\\nAnswer: hats'), cloze items built from them
    in both exam formats, and a tiny model trained on it with eval_mcq, eval_generate, tensorboard_log."""
    root = tmp_path_factory.mktemp('facts')
    rng = random.Random(0)
    pairs = list(zip(NAMES, rng.sample(THINGS, len(THINGS))))
    (root / 'corpus').mkdir()
    for copy in range(8):
        for i, (name, thing) in enumerate(pairs):
            (root / 'corpus' / f'{i}_{copy}.txt').write_text(f"Question: What does {name} keep?\nAnswer: {thing}\n")
    mmlu, kor = [], []
    for name, thing in pairs:
        choices = rng.sample([t for t in THINGS if t != thing], 3) + [thing]
        rng.shuffle(choices)
        mmlu.append({'question': f'What does {name} keep?', 'choices': choices, 'answer': choices.index(thing)})
        kor.append({'question': f'What does {name} keep?', **dict(zip('ABCD', choices)), 'answer': choices.index(thing) + 1})
    for name, rows in (('exam.jsonl', mmlu), ('kor.jsonl', kor)):
        (root / name).write_text(''.join(json.dumps(r) + '\n' for r in rows))
    data, out = str(root / 'data'), str(root / 'out')
    run('prepare.py', f'--input={root / "corpus"}', '--dataset=facts', f'--data_dir={data}', '--tokenizer=byte',
        '--val_fraction=0.2', '--min_split_tokens=100')
    p = run('train.py', *MODEL, '--dataset=facts', f'--data_dir={data}', f'--out_dir={out}', '--batch_size=16',
            '--max_iters=100', '--eval_interval=50', '--rolling_interval=50', '--eval_iters=2', '--warmup_iters=10',
            '--learning_rate=3e-3', '--log_interval=10', f'--eval_mcq={root / "exam.jsonl"}', '--eval_generate',
            *(['--tensorboard_log'] if importlib.util.find_spec('tensorboard') else []))  # optional dependency
    return dict(root=root, data=data, out=out, train_stdout=p.stdout)


def evaluate(facts, *args, check=True):
    return run('evaluate.py', f'--out_dir={facts["out"]}', f'--data_dir={facts["data"]}', '--max_new_tokens=60',
               '--num_samples=2', *args, check=check)


def test_training_logs_the_baseline_at_iteration_0_and_each_eval(facts):
    evals = [e for e in read_log(facts['out']) if 'val_loss' in e]
    assert [e['step'] for e in evals] == [0, 50, 100]
    keys = {'mcq_acc', 'mcq_acc_norm', 'repetition', 'distinct_1', 'distinct_4', 'code_parses', 'code_keywords'}
    assert all(keys <= e.keys() for e in evals)
    assert 'eval 0: mcq_acc ' in facts['train_stdout']
    if glob.glob(os.path.join(facts['out'], 'tb', 'events.out.tfevents.*')):  # tensorboard is installed
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        tags = EventAccumulator(os.path.join(facts['out'], 'tb')).Reload().Tags()['scalars']
        assert {'eval/mcq_acc', 'eval/repetition', 'eval/val_loss', 'train/loss'} <= set(tags)
        assert 'train/iter' not in tags  # the step is TensorBoard's own x axis
        texts = EventAccumulator(os.path.join(facts['out'], 'tb')).Reload().Tags()['tensors']
        assert 'config/text_summary' in texts  # the run's config, as text


def test_compare_checkpoints_in_one_table_and_json(facts):
    root = facts['root']
    args = ['--ckpt=step_0000050,latest', f'--mcq={root / "exam.jsonl"}', f'--json={root / "eval.json"}']
    p = evaluate(facts, *args)
    lines = p.stdout.splitlines()
    assert 'non-overlapping windows of 64 tokens' in lines[0]
    assert lines[3].split() == ['step_0000050', 'latest']
    assert any(line.startswith('mcq acc ') for line in lines) and any(line.startswith('repetition ') for line in lines)
    result = json.loads((root / 'eval.json').read_text())
    first, latest = result['checkpoints']
    assert latest['iter_num'] == 100 and latest['tokenizer']['kind'] == 'byte'
    assert latest['mcq']['items'] == 10 and latest['mcq']['chance'] == 0.25
    assert latest['perplexity']['ppl'] < first['perplexity']['ppl']
    assert len(latest['generation']['samples']) == 3 * 2 and result['settings']['seed'] == 1337
    # deterministic: the same call gives the same samples; the KorMedMCQA format gives the same scores
    evaluate(facts, '--ckpt=latest', f'--mcq={root / "kor.jsonl"}', f'--json={root / "again.json"}', '--split=')
    again = json.loads((root / 'again.json').read_text())['checkpoints'][0]
    assert again['generation'] == latest['generation'] and again['mcq'] == latest['mcq']


def test_text_file_with_stride_and_plot(facts):
    root = facts['root']
    (root / 'notes.txt').write_text("Question: What does Anna keep?\nAnswer: nothing at all, she said.\n" * 5)
    p = evaluate(facts, f'--text={root / "notes.txt"}', '--stride=16', '--generate=False')
    assert 'windows of 64 tokens every 16, each scoring its last 16' in p.stdout
    assert 'bits per byte' in p.stdout
    pytest.importorskip('matplotlib')
    evaluate(facts, f'--plot={root / "curves.png"}')
    assert (root / 'curves.png').read_bytes()[:4] == b'\x89PNG'


def test_progress_on_a_terminal_a_line_per_stage_in_a_log(facts):
    root = facts['root']
    args = [f'--out_dir={facts["out"]}', f'--data_dir={facts["data"]}', '--max_new_tokens=20', '--num_samples=2',
            f'--mcq={root / "exam.jsonl"}']
    code, out, err = run_on_tty('evaluate.py', *args)
    assert code == 0 and out.splitlines()[3].split() == ['latest']  # the default ckpt's column: its file, not 'resume'
    for bar in ('perplexity: ', 'window/s', 'generation: ', 'step/s', 'multiple choice: ', 'row/s'):
        assert bar in err, bar
    assert '\r' not in out and '%|' not in out  # the table on stdout stays clean
    p = evaluate(facts, f'--mcq={root / "exam.jsonl"}')  # stderr a pipe, as in a log: the lines only
    assert '\r' not in p.stderr and '%|' not in p.stderr
    stages = [line.split(': ', 1)[1].split(' in ')[0] for line in p.stderr.splitlines()[1:]]
    assert stages == ['perplexity over 599 tokens (10 windows)', '6 samples generated',
                      '10 multiple-choice items scored', 'evaluated'], p.stderr


@pytest.mark.parametrize('content, args, message', [
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"]', ['--mcq=FILE'],
     'FILE, line 2: not valid JSON'),
    ('{"question": "q", "A": "a", "B": "b", "answer": 3}\n', ['--mcq=FILE'], 'FILE, line 1: answer 3 is out of range'),
    (b'def add(a, b):\nclass \xc0\n', ['--prompts=FILE'], 'FILE, line 2: not UTF-8 text'),
    ('', ['--ckpt=step_0000999'], "checkpoint 'step_0000999' not found"),
])
def test_bad_input_is_one_line(facts, tmp_path, content, args, message):
    path = tmp_path / 'input'
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    p = evaluate(facts, *[a.replace('FILE', str(path)) for a in args], check=False)
    assert p.returncode != 0 and p.stdout == ''
    assert p.stderr.startswith('evaluate.py: error: ') and p.stderr.count('\n') == 1, p.stderr
    assert message.replace('FILE', str(path)) in p.stderr


def test_sample_interactive(facts):
    cmd = [sys.executable, os.path.join(ROOT, 'sample.py'), f'--out_dir={facts["out"]}', '--interactive',
           '--max_new_tokens=20', '--num_samples=1']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    stdin = 'Question: What does Anna\n\n:temperature 0\n:top_k abc\n:seeed 3\nQuestion: What\\\n does Anna\n'
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.count('-' * 40) == 2  # two prompts answered, the blank line skipped
    assert 'Question: What\n does Anna' in p.stdout  # a line ending in a backslash goes on
    assert 'temperature=0.0' in p.stderr and 'top_k must be a number' in p.stderr
    assert "unknown config key 'seeed'" in p.stderr and 'Traceback' not in p.stderr
    # Ctrl-C while waiting for a prompt leaves cleanly
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert 'Ctrl-D or Ctrl-C leaves' in proc.stderr.readline() + proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and 'Traceback' not in err


def test_sample_and_evaluate_take_a_training_config(facts, tmp_path):
    config = tmp_path / 'run.py'
    config.write_text(f"out_dir = {facts['out']!r}\ndata_dir = {facts['data']!r}\nbatch_size = 16\n"
                      "n_layer = 2\nlearning_rate = 3e-3\ncompile = False\n")
    p = run('sample.py', str(config), '--start=Question:', '--max_new_tokens=5', '--num_samples=1')
    assert p.stdout.startswith('Question:')
    evaluate(facts, str(config), '--generate=False')
    # how: keys train.py's defaults block assigns are skipped in config files, a typo is still an error
    train_keys = script_keys(os.path.join(ROOT, 'train.py'))
    assert {'batch_size', 'learning_rate', 'out_dir', 'compile'} <= train_keys
    defaults = {'out_dir': 'out', 'temperature': 0.8}
    cfg, explicit = configure(defaults, [str(config)], ignore=train_keys)
    assert cfg == {'out_dir': facts['out'], 'temperature': 0.8} and explicit == {'out_dir'}
    (tmp_path / 'typo.py').write_text("temprature = 0.5\n")
    with pytest.raises(Error, match="unknown config key 'temprature' in .*typo.py \\(did you mean 'temperature'"):
        configure(defaults, [str(tmp_path / 'typo.py')], ignore=train_keys)
    with pytest.raises(Error, match="unknown config key 'batch_size'"):  # on the command line: an error
        configure(defaults, ['--batch_size=4'], ignore=train_keys)
