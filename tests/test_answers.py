"""Answers: exact match normalised as lm-evaluation-harness's exact_match, score_qa's answer loss
against a hand computation over the tokens training flags, greedy exact match, sample.py rendering
a prompt with the checkpoint's template, evaluate.py --qa end to end and its bad files, and the
per-dataset val losses of the training curves."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import dataset as ds
import metrics
from conftest import run
from errors import Error
from model import GPT, GPTConfig

CHAT = {'system': 'S: {content}\n', 'user': 'Q: {content}\n', 'assistant': 'A: {content}'}
RECORDS = [{'prompt': 'Capital of France? ', 'completion': 'Paris'},
           {'messages': [{'role': 'system', 'content': 'Be brief.'},
                         {'role': 'user', 'content': 'Hi?'},
                         {'role': 'assistant', 'content': 'Hello.'}]},
           {'messages': [{'role': 'user', 'content': 'One?'},
                         {'role': 'assistant', 'content': '1'},
                         {'role': 'user', 'content': 'Two?'},
                         {'role': 'assistant', 'content': '2'}]},
           {'prompt': 'long ' * 30, 'completion': 'prompt'}]  # 150 bytes: cut to the block's


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A tiny byte-level model that never says end-of-text (its row is zero: a logit of 0 against
    256 random ones), so each greedy answer is max_new_tokens long; a checkpoint of it whose
    tokenizer record holds CHAT, one without, and RECORDS as a JSONL file."""
    root = tmp_path_factory.mktemp('answers')
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257)).eval()
    with torch.no_grad():
        model.transformer.wte.weight[256] = 0
    tok = ds.load_tokenizer(ds.make_state('byte'))
    for name, record in (('chat', dict(ds.make_state('byte'), template=CHAT)),
                         ('base', ds.make_state('byte'))):
        checkpoint.save(root / f'{name}.safetensors', {
            'model': model.state_dict(), 'tokenizer': record,
            'model_args': dataclasses.asdict(model.config)})
    (root / 'qa.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in RECORDS))
    return model, tok, root


@pytest.mark.parametrize('options, text, expected', [
    ({}, ' The Cat, 42!\n', ' The Cat, 42!\n'),  # nothing, whitespace included
    ({'ignore_case': True}, 'The CAT', 'the cat'),
    ({'ignore_punctuation': True}, "It's 4.5, ok?!", 'Its 45 ok'),
    ({'ignore_numbers': True}, 'abc123 4x', 'abc x'),
    ({'regexes_to_ignore': ['(?s).*#### ', ',']}, 'so\n#### 1,234', '1234'),
    ({'regexes_to_ignore': ['a', 'ab']}, 'abab', 'bb'),  # in turn: 'a' first, then 'ab' is gone
    ({'regexes_to_ignore': ['ab', 'a']}, 'abab', ''),
    ({'regexes_to_ignore': ['the '], 'ignore_case': True}, 'The end', 'the end'),  # regexes first
    ({'ignore_case': True, 'ignore_punctuation': True, 'ignore_numbers': True}, 'A1.b2', 'ab'),
])
def test_exact_match_normalisations(options, text, expected):
    assert metrics.em_normalise(text, **options) == expected


def test_em_regexes_option():
    assert metrics.em_regexes('') == [] and metrics.em_regexes(r'\$,\.$') == [r'\$', r'\.$']
    assert metrics.em_regexes(r'[\,.],x') == [r'[\,.]', 'x']  # an escaped comma is the regex's
    assert metrics.em_normalise('1,234.', metrics.em_regexes(r'[\,.]')) == '1234'
    assert metrics.em_regexes([',', 'a{1,2}']) == [',', 'a{1,2}']  # a list (a config file) as it is
    with pytest.raises(Error, match=r"em_regexes_to_ignore: 'a\(' is not a regular expression"):
        metrics.em_regexes('a(')


def test_answer_loss_is_the_nll_of_the_flagged_tokens(setup):
    model, tok, root = setup
    items = metrics.load_qa(root / 'qa.jsonl')
    got = metrics.score_qa(model, tok, items, CHAT, max_new_tokens=4, batch_size=3)
    total = tokens = 0
    for record in RECORDS:  # as prepare.py stores it: segments, then the document's end-of-text
        segs = ds.segments(record, metrics.QA_FIELDS, CHAT) + [(None, True)]
        ids, flags = ds.encode_segments(tok, segs)
        last = len(flags) - np.argmin(flags[::-1])  # where the last run of flagged tokens starts
        # targets: the last 64 tokens (a window of the block's 64 inputs)
        ids, scored = ids[-65:].astype(np.int64), np.arange(1, len(ids))[-64:] >= last
        logits, _ = model(torch.tensor(ids[None, :-1]), torch.tensor(ids[None, 1:]))
        nll = -F.log_softmax(logits[0].float(), -1)[torch.arange(len(ids) - 1), ids[1:]]
        total += nll[torch.tensor(scored)].sum().item()
        tokens += int(scored.sum())
    assert got['tokens'] == tokens == 6 + 7 + 2 + 7  # each answer and its end-of-text
    assert got['loss'] == pytest.approx(total / tokens, abs=1e-5)
    assert got['ppl'] == pytest.approx(np.exp(total / tokens), rel=1e-5)
    assert got['truncated'] == 1 and [a['truncated'] for a in got['answers']][-1]


def test_greedy_exact_match_and_the_rendered_prompt(setup, tmp_path):
    model, tok, root = setup
    items = metrics.load_qa(root / 'qa.jsonl')
    first = metrics.score_qa(model, tok, items, CHAT, max_new_tokens=6)
    assert first['exact_match'] == 0 and not any(a['ended'] for a in first['answers'])
    right = []  # the same questions, answered as the model answers them
    for record, answer in zip(RECORDS, first['answers']):
        record = json.loads(json.dumps(record))
        if 'messages' in record:
            record['messages'][-1]['content'] = answer['prediction']
        else:
            record['completion'] = answer['prediction']
        right.append(record)
    (tmp_path / 'right.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in right))
    again = metrics.score_qa(model, tok, metrics.load_qa(tmp_path / 'right.jsonl'), CHAT, 6)
    assert again['exact_match'] == 1.0 and again['correct'] == again['items'] == 4
    # the prompt is what sample.py feeds: the turns before the answer, then the assistant's prefix
    messages = RECORDS[1]['messages']
    prompt, answer, reference = metrics.qa_render(items[1], CHAT)
    assert prompt == ds.conversation(messages[:-1], CHAT, 'x', answer=False)
    assert [t for t, _ in prompt] == ['S: Be brief.\n', 'Q: Hi?\n', 'A: ']
    assert answer == reference == 'Hello.'
    assert metrics.qa_render(items[0]) == ([('Capital of France? ', False)], 'Paris', 'Paris')


def test_sample_renders_the_prompt_with_the_checkpoints_template(setup):
    _, _, root = setup
    common = [f'--ckpt={root / "chat.safetensors"}', '--temperature=0', '--max_new_tokens=12',
              '--num_samples=1']
    chat = run('sample.py', *common, '--start=Hi there')
    assert "prompt: a user turn in the checkpoint's template" in chat.stderr
    assert chat.stdout.startswith('Hi there\n')  # the prompt as given, then the answer
    # a byte tokenizer encodes segments as it does their text joined: the rendered text, given as
    # plain text, is the same prompt, and gets the same answer
    plain = run('sample.py', *common, '--template=none', '--start=Q: Hi there\nA: ')
    assert 'prompt: plain text (--template=none)' in plain.stderr
    assert chat.stdout[len('Hi there\n'):] == plain.stdout[len('Q: Hi there\nA: '):]
    base = run('sample.py', *common, f'--ckpt={root / "base.safetensors"}', '--start=Hi there')
    assert 'trained without conversations' in base.stderr


def test_evaluate_qa_table_and_json(setup, tmp_path):
    _, _, root = setup
    p = run('evaluate.py', f'--ckpt={root / "base.safetensors"},{root / "chat.safetensors"}',
            '--split=', '--generate=False', f'--qa={root / "qa.jsonl"}', '--qa_max_new_tokens=5',
            '--em_ignore_case', f'--json={tmp_path / "e.json"}')
    rows = {line.split('  ')[0]: line.split() for line in p.stdout.splitlines()}
    assert rows['exact match'][-2:] == ['0.000', '(0/4)'] and 'answer loss' in rows
    assert rows['prompts truncated'][-1] == '1' and 'with ignore_case' in p.stdout
    assert 'rendered with the default template (dataset.TEMPLATE)' in p.stderr  # base has none
    base, chat = json.loads((tmp_path / 'e.json').read_text())['checkpoints']
    assert chat['qa']['template'] == CHAT and base['qa']['template'] == ds.TEMPLATE
    assert len(chat['qa']['answers']) == 4 and 'prediction' in chat['qa']['answers'][0]
    assert base['qa']['loss'] != pytest.approx(chat['qa']['loss'], abs=1e-3)  # another rendering


@pytest.mark.parametrize('line, message', [
    ('{"prompt": "q", "completion": "a"}\n{"prompt": "q"', 'line 2: not valid JSON'),
    ('{"text": "a document"}', 'line 1: a document ("text"), not a question with its answer'),
    ('{"prompt": "q", "completion": ""}', "line 1: 'completion' is empty"),
    ('{"messages": [{"role": "user", "content": "q"}]}', 'line 1: \'messages\' has no assistant'),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "line 1: 'messages' turn 1: role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
     "line 1: 'messages': the last turn is the user's"),
])
def test_bad_qa_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / 'bad.jsonl').write_text(line + '\n')
    with pytest.raises(Error, match=re.escape(f'bad.jsonl, {message}')):
        metrics.load_qa(tmp_path / 'bad.jsonl')


@pytest.mark.parametrize('args, message', [
    (['--qa=BAD'], 'BAD, line 2: not valid JSON'),
    (['--qa=GOOD', '--template=none'], '--template=none: GOOD holds conversations'),
    (['--qa=GOOD', '--em_regexes_to_ignore=a('], "'a(' is not a regular expression"),
])
def test_bad_qa_input_is_one_line_and_writes_nothing(setup, tmp_path, args, message):
    (tmp_path / 'bad.jsonl').write_text('{"prompt": "q", "completion": "a"}\n{"prompt": \n')
    paths = {'BAD': str(tmp_path / 'bad.jsonl'), 'GOOD': str(setup[2] / 'qa.jsonl')}
    args = [a.replace('BAD', paths['BAD']).replace('GOOD', paths['GOOD']) for a in args]
    p = run('evaluate.py', f'--out_dir={tmp_path / "none"}', f'--json={tmp_path / "e.json"}',
            *args, check=False)
    assert p.returncode == 1 and p.stdout == '' and p.stderr.count('\n') == 1, p.stderr
    assert p.stderr.startswith('evaluate.py: error: ')
    assert message.replace('BAD', paths['BAD']).replace('GOOD', paths['GOOD']) in p.stderr
    assert not (tmp_path / 'e.json').exists() and not (tmp_path / 'none').exists()


def test_plot_draws_each_datasets_val_loss(tmp_path, monkeypatch):
    figure = pytest.importorskip('matplotlib.figure')
    log = [{'step': s, 'loss': 5 - s / 50, 'lr': 1e-3, 'tokens_per_sec': 900.0} for s in (10, 20)]
    log += [{'step': s, 'train_loss': 5 - s / 50, 'val_loss': 5.1 - s / 50,
             'val_loss/qa': 5.5 - s / 40, 'val_loss/stdlib': None if s == 0 else 4.9 - s / 60}
            for s in (0, 20)]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in log))
    assert metrics.read_log(tmp_path / 'log.jsonl')[-1]['val_loss/qa'] == 5.5 - 20 / 40
    figures, savefig = [], figure.Figure.savefig  # the figure plot_log draws, to look at it
    monkeypatch.setattr(figure.Figure, 'savefig',
                        lambda fig, *a, **k: figures.append(fig) or savefig(fig, *a, **k))
    metrics.plot_log(tmp_path / 'log.jsonl', tmp_path / 'curves.png')
    assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    assert {'val loss (eval)', 'val loss (qa)', 'val loss (stdlib)'} <= set(lines)
    assert list(lines['val loss (stdlib)'].get_xdata()) == [20]  # null: no point
    styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines.values()}
    assert len(styles) == len(lines)  # each line its own look
    log[-1]['val_loss/qa'] = 'high'
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in log))
    with pytest.raises(Error, match="line 4: val_loss/qa='high' is not a number"):
        metrics.read_log(tmp_path / 'log.jsonl')
