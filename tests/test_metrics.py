"""metrics.py on tiny models: perplexity and bits per byte, repetition, code validity, multiple choice."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataset as ds
import metrics
from errors import Error
from model import GPT, GPTConfig

TEXT = "def add(a, b):\n    return a + b  # 더하기\n"  # Korean: more bytes than characters


@pytest.fixture(scope='module')
def bpe():
    """A tiny byte-level BPE, so tokens, characters and bytes all differ."""
    words = ["def add(a, b):", "return a + b", "Question: what is it?", "Answer: the answer", "더하기 빼기"]
    return ds.load_tokenizer(ds.make_state('bpe', ds.train_bpe(iter(words * 20), vocab_size=300)))


def tiny(vocab_size, block_size=32, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32,
                    padded_vocab_size=vocab_size + 40)  # padding columns must never be scored
    return GPT(cfg).eval()


def test_perplexity_memorised_is_near_1_and_shuffled_is_high():
    tok = ds.load_tokenizer(ds.make_state('byte'))
    text = "the quick brown fox jumps over the lazy dog; 0123456789 ABCDEFGHI"[:63]
    tokens = metrics.encode_docs(tok, [text])  # 63 bytes + end-of-text: two windows of 32
    seq = torch.tensor(np.concatenate([[tok.eot_id], tokens]))
    x, y = seq[:-1].view(2, 32), seq[1:].view(2, 32)  # exactly the windows perplexity() scores
    model = tiny(tok.vocab_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    memorised = metrics.perplexity(model, tokens, tok)
    assert memorised['tokens'] == 64 and memorised['windows'] == 2 and memorised['ppl'] < 1.1
    shuffled = np.concatenate([np.random.default_rng(0).permutation(tokens[:-1]), tokens[-1:]])
    assert metrics.perplexity(model, shuffled, tok)['ppl'] > 20


def test_bits_per_byte_by_hand(bpe):
    model = tiny(bpe.vocab_size)
    tokens = metrics.encode_docs(bpe, [TEXT * 3, TEXT])
    r = metrics.perplexity(model, tokens, bpe)
    n_bytes = len((TEXT * 4).encode('utf-8'))
    assert r['bytes'] == n_bytes and r['tokens'] == len(tokens) and len(tokens) - 2 < n_bytes
    seq = torch.tensor(np.concatenate([[bpe.eot_id], tokens]))
    total = 0.0
    for b in range(0, len(tokens), 32):  # non-overlapping windows, every target once
        e = min(b + 32, len(tokens))
        logits, _ = model(seq[b:e][None], seq[b + 1:e + 1][None])
        total += F.cross_entropy(logits[0], seq[b + 1:e + 1], reduction='sum').item()
    assert r['loss'] == pytest.approx(total / len(tokens), rel=1e-5)
    assert r['bits_per_byte'] == pytest.approx(r['loss'] / math.log(2) * r['tokens'] / n_bytes, rel=1e-9)


@pytest.mark.parametrize('stride', [8, 32])
def test_stride_scores_each_token_once_with_its_window_context(bpe, stride):
    model = tiny(bpe.vocab_size)
    tokens = metrics.encode_docs(bpe, [TEXT * 6])
    r = metrics.perplexity(model, tokens, bpe, stride=stride, batch_size=3)
    seq = torch.tensor(np.concatenate([[bpe.eot_id], tokens]))
    total, N = 0.0, len(tokens)
    for j in range(N):  # target j (token seq[j + 1]): the window that scores it, then its context
        begin = 0 if j < 32 else ((j - 32) // stride + 1) * stride
        logits, _ = model(seq[begin:j + 1][None])
        total += F.cross_entropy(logits[0, -1:], seq[j + 1:j + 2]).item()
    assert r['tokens'] == N and r['stride'] == stride
    assert r['loss'] * N == pytest.approx(total, rel=1e-4)


def test_repetition_flags_loops_and_not_varied_text():
    units = metrics.UNIT.findall
    assert metrics.repeats(units("x = 1\nprint(x)" + ":)" * 40))  # seed 004's collapse
    assert metrics.repeats(units("def f():\n" + "    return None\n" * 12))  # a looping line
    assert not metrics.repeats(units("def add(a, b):\n    '''Sum.'''\n    total = a + b\n    return total\n\n"
                                     "class DataLoader:\n    def __init__(self, path):\n        self.path = path\n"))
    assert not metrics.repeats(units("x = 1\nprint(x)\ny = x + 2\n" + ":)" * 3))  # a short repeat at the end
    assert not metrics.repeats([])
    assert metrics.distinct([['a', 'b', 'a', 'b']], 1) == 0.5 and metrics.distinct([['a', 'b', 'a', 'b']], 2) == 2 / 3


def test_code_validity_trims_only_a_cut_off_end():
    cut = "def add(a, b):\n    return a + b\n\nclass DataLoader:\n    def load(self, path):\n        with open(pa"
    assert metrics.code_parses(cut, cut_off=True)
    assert not metrics.code_parses(cut, cut_off=False)  # a sample that ended by itself must parse whole
    broken = "def add(a, b):\n    return a +* b\n\nprint(add(1, 2))\nx = ("
    assert not metrics.code_parses(broken, cut_off=True)
    assert not metrics.code_parses("import numpy as np\n    foo bar baz", cut_off=True, keep_lines=2)  # never the prompt alone
    m = metrics.generation_metrics([dict(prompt='def add(a, b):', text=cut[14:], cut_off=True),
                                    dict(prompt='def add(a, b):', text=':):):):):)', cut_off=False)])
    assert m['code_parses'] == 0.5 and m['code_keywords'] == 0.5 and m['repetition'] == 0.5


def slow_mcq(model, tok, items, shots=()):
    """The reference: one plain forward per choice, the harness's token split and left truncation."""
    T, out = model.config.block_size, []
    for item in items:
        context = metrics.mcq_context(item, shots)
        ctx_ids, lls = tok.encode(context), []
        for choice in item['choices']:
            cont = tok.encode(context + ' ' + choice)[len(ctx_ids):]
            seq = torch.tensor((ctx_ids + cont)[-(T + 1):])
            y = seq[1:].clone()
            y[:-len(cont)] = -1
            _, loss = model(seq[None, :-1], y[None])
            lls.append(-loss.item() * len(cont))
        out.append(lls)
    return out


def test_mcq_batched_equals_one_forward_per_choice(bpe):
    model = tiny(bpe.vocab_size, block_size=48)
    rng = np.random.default_rng(0)
    words = ['add', 'return', 'answer', 'it', 'what', 'the', '더하기', 'b):', 'Question']
    items = [dict(question=' '.join(rng.choice(words, rng.integers(1, 12))),
                  choices=[' '.join(rng.choice(words, rng.integers(1, 6))) for _ in range(rng.integers(2, 6))])
             for _ in range(12)]
    for item in items:
        item['answer'] = int(rng.integers(len(item['choices'])))
    tol = 1e-4  # batched rows are padded and summed in another order: ~1e-6 apart here
    for shots in ((), items[:2]):  # with two solved examples most rows exceed block_size
        got = metrics.score_mcq(model, bpe, items, shots, batch_size=5)
        ref = slow_mcq(model, bpe, items, shots)
        assert np.allclose(np.concatenate(got['loglikelihoods']), np.concatenate(ref), atol=tol)
        # acc and acc_norm take argmaxes, the same on both paths only where no two best scores are
        # within tol (a tie goes either way, machine by machine): none is, by 10x at least
        for r, it in zip(ref, items):
            for scores in (np.array(r), np.array(r) / [len(c) for c in it['choices']]):
                second, best = np.sort(scores)[-2:]
                assert best - second > 10 * tol, (it, r)
        acc = np.mean([np.argmax(r) == it['answer'] for r, it in zip(ref, items)])
        norm = np.mean([np.argmax(np.array(r) / [len(c) for c in it['choices']]) == it['answer'] for r, it in zip(ref, items)])
        assert (got['acc'], got['acc_norm'], got['items']) == (acc, norm, 12)


def test_tiny_model_trained_on_sentences_answers_cloze_items():
    tok = ds.load_tokenizer(ds.make_state('byte'))
    rng = np.random.default_rng(0)
    names = ['Anna', 'Boris', 'Chen', 'Dara', 'Emil', 'Fatima', 'Goran', 'Hana', 'Ivan', 'Jana']
    things = ['apples', 'bricks', 'candles', 'drums', 'eggs', 'flutes', 'gloves', 'hats', 'inks', 'jars']
    pairs = list(zip(names, rng.permutation(things)))
    docs = [tok.encode(f"Question: What does {name} keep?\nAnswer: {thing}") + [tok.eot_id] for name, thing in pairs]
    x = torch.full((len(docs), max(map(len, docs)) - 1), tok.eot_id)
    y = torch.full_like(x, -1)
    for i, d in enumerate(docs):
        x[i, :len(d) - 1], y[i, :len(d) - 1] = torch.tensor(d[:-1]), torch.tensor(d[1:])
    model = tiny(tok.vocab_size, block_size=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    items = []
    for name, thing in pairs:
        choices = list(rng.choice([t for t in things if t != thing], 3, replace=False)) + [thing]
        rng.shuffle(choices)
        items.append(dict(question=f"What does {name} keep?", choices=[str(c) for c in choices], answer=choices.index(thing)))
    r = metrics.score_mcq(model.eval(), tok, items)
    assert r['chance'] == 0.25 and r['acc'] >= 0.8 and r['acc_norm'] >= 0.8


def test_both_mcq_formats(tmp_path):
    mmlu = [{"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
            {"question": "Capital?", "choices": ["Rome", "Oslo"], "answer": "B"}]
    kor = [{"question": "2+2?", "A": "3", "B": "4", "C": "5", "answer": 2, "subject": "math"},
           {"question": "Capital?", "A": "Rome", "B": "Oslo", "answer": "2"}]
    for name, rows in (('mmlu.jsonl', mmlu), ('kor.jsonl', kor)):
        (tmp_path / name).write_text('\n'.join(json.dumps(r) for r in rows) + '\n\n')
    expected = [dict(question='2+2?', choices=['3', '4', '5'], answer=1),
                dict(question='Capital?', choices=['Rome', 'Oslo'], answer=1)]
    assert metrics.load_mcq(tmp_path / 'mmlu.jsonl') == expected == metrics.load_mcq(tmp_path / 'kor.jsonl')
    assert metrics.mcq_context(expected[1], expected[:1]) == "Question: 2+2?\nAnswer: 4\n\nQuestion: Capital?\nAnswer:"


@pytest.mark.parametrize('line, message', [
    ('{"question": "q", "choices": ["a", "b"], "answer": 1', 'not valid JSON'),
    ('{"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "E": "e", "answer": 6}', 'answer 6 is out of range for 5'),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', 'answer 2 is out of range for 2 choices (0-based'),
    ('{"question": "q", "choices": ["only"], "answer": 0}', '1 choice(s), at least 2'),
    ('{"question": "q", "A": "a", "answer": "A"}', '1 choice(s), at least 2'),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}', 'choice B must be non-empty'),
    ('{"question": "q", "choices": ["a", "b"]}', '"answer" must be a letter or a 0-based index, got None'),
    ('["q", "a", "b"]', 'expected a JSON object with a "question" string'),
])
def test_bad_exam_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / 'exam.jsonl'
    path.write_text('{"question": "fine", "choices": ["a", "b"], "answer": 0}\n\n' + line + '\n')
    with pytest.raises(Error) as e:
        metrics.load_mcq(path)
    assert str(e.value).startswith(f"{path}, line 3: ") and message in str(e.value) and '\n' not in str(e.value)


def test_prompts_file(tmp_path):
    path = tmp_path / 'prompts.txt'
    path.write_text('def add(a, b):\n\n"class A:\\n    def "\n')
    assert metrics.load_prompts(path) == ['def add(a, b):', 'class A:\n    def ']
    path.write_bytes(b'fine\nalso fine\nbad \xff byte\n')
    with pytest.raises(Error, match=r'prompts.txt, line 3: not UTF-8 text \(byte 0xff\)'):
        metrics.load_prompts(path)


def test_plot_is_a_png(tmp_path):
    pytest.importorskip('matplotlib')
    log = [{'step': 0, 'train_loss': 5.6, 'val_loss': 5.6, 'mcq_acc': 0.25}]
    log += [{'step': s, 'loss': 5 - s / 100, 'lr': 1e-3, 'tokens_per_sec': None if s == 10 else 900.0}
            for s in (*range(10, 60, 10), 40, 50, 60, 70)]  # killed after 50, resumed from 30: 40, 50 again
    log += [{'step': 70, 'train_loss': 4.4, 'val_loss': 4.5, 'mcq_acc': 0.5}]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in log))
    metrics.plot_log(tmp_path / 'log.jsonl', tmp_path / 'curves.png')
    assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
