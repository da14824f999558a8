"""Multiple-choice prompt templates (mcq_template, mcq_delimiter) as lm-evaluation-harness's doc_to_text
and target_delimiter: a cloze exam scored against log-likelihoods computed here by hand, fewshot
examples in the same template, one-line template errors before any model loads, and progress bars
for evaluate.py but never for train.py's training_metrics."""
import io
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import dataset as ds
import metrics
from errors import Error
from conftest import run
from model import GPT, GPTConfig

ITEMS = [dict(question='The cat sat on the', choices=['mat', 'moon', 'dog bed'], answer=0),
         dict(question='def add(a, b):\n    return a', choices=['+ b', '* b'], answer=0)]


@pytest.fixture(scope='module')
def setup():
    words = ['The cat sat on the mat', 'def add(a, b):', 'return a + b', 'the moon', 'a dog bed']
    tok = ds.load_tokenizer(ds.make_state('bpe', ds.train_bpe(iter(words * 20), vocab_size=300)))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    return model, tok


def by_hand(model, tok, context, continuation):
    """Sum of log p(continuation token | everything before it), the harness's token split:
    the continuation's tokens are those of context + continuation past the context's own."""
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    seq = torch.tensor(ctx + cont)
    logits, _ = model(seq[None, :-1], seq[None, 1:])  # targets given: logits at every position
    logp = F.log_softmax(logits[0].float(), dim=-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_cloze_template_scores_raw_text_like_the_harness(setup):
    model, tok = setup
    assert metrics.mcq_context(ITEMS[0], template='{question}') == 'The cat sat on the'
    got = metrics.score_mcq(model, tok, ITEMS, template='{question}', delimiter=' ', batch_size=2)
    for item, lls in zip(ITEMS, got['loglikelihoods']):
        expected = [by_hand(model, tok, item['question'], ' ' + c) for c in item['choices']]
        assert lls == pytest.approx(expected, abs=1e-4)
    default = metrics.score_mcq(model, tok, ITEMS)  # 'Question: ...\nAnswer:': another context, other scores
    assert default['loglikelihoods'][0] != pytest.approx(got['loglikelihoods'][0], abs=1e-3)


def test_trailing_space_moves_to_the_choice_as_in_the_harness(setup):
    model, tok = setup
    spaced = metrics.score_mcq(model, tok, ITEMS, template='Question: {question}\nAnswer: ', delimiter='')
    default = metrics.score_mcq(model, tok, ITEMS)  # 'Question: {question}\nAnswer:' + ' ' + choice: the same tokens
    for a, b in zip(spaced['loglikelihoods'], default['loglikelihoods']):
        assert a == pytest.approx(b, abs=1e-5)


def test_fewshot_examples_use_the_template(setup):
    model, tok = setup
    assert metrics.mcq_context(ITEMS[1], ITEMS[:1], '{question}', ' ') == (
        'The cat sat on the mat\n\ndef add(a, b):\n    return a')
    assert metrics.mcq_context(ITEMS[1], ITEMS[:1], 'Q: {question}\nA:', ' -> ').startswith('Q: The cat sat on the\nA: -> mat\n\n')
    got = metrics.score_mcq(model, tok, ITEMS[1:], ITEMS[:1], template='{question}')
    context = 'The cat sat on the mat\n\ndef add(a, b):\n    return a'
    assert got['loglikelihoods'][0] == pytest.approx([by_hand(model, tok, context, ' ' + c) for c in ITEMS[1]['choices']],
                                                     abs=1e-4)


def test_template_fields_come_from_the_record(tmp_path):
    path = tmp_path / 'exam.jsonl'
    path.write_text('{"question": "2+2?", "subject": "math", "choices": ["3", "4"], "answer": 1}\n'
                    '{"question": "Capital?", "choices": ["Rome", "Oslo"], "answer": 0}\n')
    assert metrics.load_mcq(path)[0] == dict(question='2+2?', choices=['3', '4'], answer=1)  # as before
    with pytest.raises(Error) as e:
        metrics.load_mcq(path, '{subject}: {question}')
    assert str(e.value).startswith(f"{path}, line 2: mcq_template '{{subject}}: {{question}}' names the field "
                                   f"'subject', which this item lacks") and '\n' not in str(e.value)
    path.write_text('{"question": "2+2?", "subject": "math", "choices": ["3", "4"], "answer": 1}\n')
    item = metrics.load_mcq(path, '{subject}: {question} ({choices[0]} or {choices[1]})')[0]
    assert metrics.mcq_context(item, template='{subject}: {question} ({choices[0]} or {choices[1]})') == \
        'math: 2+2? (3 or 4)'


@pytest.mark.parametrize('template, message', [
    ('{subject} {question}', "exam.jsonl, line 1: mcq_template '{subject} {question}' names the field 'subject'"),
    ('{choices[7]}', "exam.jsonl, line 1: mcq_template '{choices[7]}' does not fit this item (IndexError"),
    ('Question: {question', "mcq_template 'Question: {question' is not a format string"),
    ('Question: {}', "mcq_template 'Question: {}' must name the item's fields"),
])
def test_template_errors_are_one_line_before_any_model(tmp_path, template, message):
    (tmp_path / 'exam.jsonl').write_text(json.dumps(dict(question='q', choices=['a', 'b'], answer=0)) + '\n')
    # no checkpoint exists in out_dir: the error must come before one is looked for
    p = run('evaluate.py', f'--mcq={tmp_path / "exam.jsonl"}', '--mcq_template', template,
            f'--out_dir={tmp_path / "none"}', check=False)
    assert p.returncode != 0 and p.stdout == '' and p.stderr.count('\n') == 1, p.stderr
    assert p.stderr.startswith('evaluate.py: error: ') and message in p.stderr, p.stderr


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_for_evaluate_silence_for_training(setup, monkeypatch):
    model, tok = setup
    err = Terminal()
    monkeypatch.setattr(sys, 'stderr', err)
    out = metrics.training_metrics(model, tok, ITEMS, ['def add'], device='cpu', mcq_template='{question}',
                                   mcq_delimiter=' ')
    assert set(out) == set(metrics.TRAINING_KEYS) and err.getvalue() == ''
    assert out['mcq_acc'] == metrics.score_mcq(model, tok, ITEMS, template='{question}')['acc']
    metrics.score_mcq(model, tok, ITEMS, progress=True)
    metrics.perplexity(model, metrics.encode_docs(tok, ['def add(a, b):\n    return a + b\n'] * 5), tok, progress=True)
    samples = metrics.generate_samples(model, tok, ['def'], num_samples=2, max_new_tokens=8, progress=True)
    assert samples == metrics.generate_samples(model, tok, ['def'], num_samples=2, max_new_tokens=8)  # the same tokens
    for bar in ('multiple choice', 'perplexity', 'generation'):
        assert bar in err.getvalue()
