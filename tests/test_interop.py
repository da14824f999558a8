"""export.py and interop.py: Hugging Face export loads in transformers with our logits, greedy tokens and
token ids; export -> import round trips; nanoGPT ckpt.pt import; offline and bad-input errors."""
import dataclasses
import json
import os

import pytest
import torch

import checkpoint
import dataset as ds
import interop
import runs
from conftest import TINY, make_corpus, run
from errors import Error
from model import GPT, GPTConfig
from weights import from_state

transformers = pytest.importorskip('transformers')  # a dev requirement; slow to import, so once here
TEXTS = ["Hello, world! The quick brown fox jumps over 13 lazy dogs.",
         "다람쥐 헌 쳇바퀴에 타고파. 한국어 문장도 같은 id로 바뀌어야 합니다.",
         "def add(a, b):\n    return a + b  # sum\n\n\tif a != b: pass\r\n"]


@pytest.fixture(scope='module')
def exported(tiny_data, tmp_path_factory):
    """kind -> (checkpoint path, its Hugging Face export): a tiny model on byte data and one on a BPE."""
    root = tmp_path_factory.mktemp('interop')
    make_corpus(root / 'corpus')
    (root / 'corpus' / 'ko.py').write_text(f"# {TEXTS[1]}\n" * 40, encoding='utf-8')
    run('prepare.py', f'--input={root / "corpus"}', '--dataset=bpe', f'--data_dir={root / "data"}',
        '--vocab_size=300', '--val_fraction=0.2')
    out = {}
    for kind, data in (('byte', f'--data_dir={tiny_data}'), ('bpe', f'--data_dir={root / "data"}')):
        run('train.py', *TINY, '--max_iters=20', '--eval_interval=20', data,
            '--dataset=tiny' if kind == 'byte' else '--dataset=bpe', f'--out_dir={root / kind}')
        run('export.py', f'--out_dir={root / kind}', '--format=hf', f'--out={root / (kind + "_hf")}')
        out[kind] = (str(root / kind / 'best.safetensors'), str(root / (kind + '_hf')))
    return out


@pytest.mark.xdist_group('interop')  # with the fixture they share: it trains once
@pytest.mark.parametrize('kind', ['byte', 'bpe'])
def test_hf_export_equals_ours_in_transformers(exported, kind):
    path, hf_dir = exported[kind]
    state = checkpoint.load(path)
    assert sorted(os.listdir(hf_dir)) == sorted(
        ['README.md', 'config.json', 'generation_config.json', 'merges.txt', 'model.safetensors',
         'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json', 'vocab.json'])
    assert os.path.getsize(os.path.join(hf_dir, 'model.safetensors')) < os.path.getsize(path) / 2  # no AdamW state
    card = open(os.path.join(hf_dir, 'README.md'), encoding='utf-8').read()
    assert state['data']['fingerprint'] in card and 'iterations: 20' in card and f"{state['val_loss']:.4f}" in card
    ours, tok = from_state(state).eval(), ds.load_tokenizer(state['tokenizer'])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        assert hf_tok(text)['input_ids'] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eot_id
    ids = torch.tensor([tok.encode(TEXTS[2])[:32]])
    with torch.no_grad():
        assert (ours(ids, ids)[0] - hf(ids).logits).abs().max() < 1e-4
    prompt = ids[:, :4]
    o = ours.generate(prompt, 27, temperature=0)[0].tolist()
    h = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=27, do_sample=False)[0].tolist()
    # greedy tokens of two implementations whose logits differ by up to 1e-4: the same up to the
    # first token whose two best logits were within 1e-3 (a near-tie: either one is greedy)
    with torch.no_grad():
        logits = ours(torch.tensor([o[:-1]]), torch.tensor([o[1:]]))[0][0]  # (T - 1, V)
    best = logits.topk(2).values
    n = next((t for t in range(4, len(o)) if best[t - 1, 0] - best[t - 1, 1] < 1e-3), len(o))
    assert h[:n] == o[:min(n, len(h))]
    assert len(h) >= n or h[-1] == tok.eot_id  # HF stops at end of text


@pytest.mark.xdist_group('interop')
@pytest.mark.parametrize('kind', ['byte', 'bpe'])
def test_export_import_round_trip(exported, kind, tmp_path):
    path, hf_dir = exported[kind]
    state = checkpoint.load(path)
    got_path, got = runs.find(f'hf:{hf_dir}', 'unused')
    assert got_path == hf_dir and 'optimizer' not in got
    assert got['tokenizer'] == state['tokenizer'] and got['model_args'] == state['model_args']
    assert got['model'].keys() == state['model'].keys()
    assert all(torch.equal(got['model'][k], state['model'][k]) for k in state['model'])
    run('export.py', f'--ckpt={path}', f'--out={tmp_path / "w.safetensors"}')  # our weights-only file
    small = checkpoint.load(tmp_path / 'w.safetensors')
    assert 'optimizer' not in small and small['iter_num'] == 20
    assert all(torch.equal(small['model'][k], state['model'][k]) for k in state['model'])


@pytest.mark.xdist_group('interop')
def test_fine_tune_from_hf_export(exported, tiny_data, tmp_path):
    p = run('train.py', *TINY, '--max_iters=3', '--eval_interval=3', '--dataset=tiny', f'--data_dir={tiny_data}',
            f'--out_dir={tmp_path}', f'--init_from=hf:{exported["byte"][1]}')
    assert 'resumed' not in p.stdout and checkpoint.load(tmp_path / 'latest.safetensors')['iter_num'] == 3
    p = run('train.py', *TINY, '--dataset=tiny', f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "b"}',
            f'--init_from=hf:{exported["bpe"][1]}', check=False)  # its tokenizer is not the data's
    assert p.returncode == 1 and f'--tokenizer={exported["bpe"][1]}/tokenizer.json' in p.stderr


@pytest.mark.xdist_group('interop')
def test_bpe_json_rebuilds_a_tokenizer_from_ranks(exported):
    """The path gpt2-kind exports take (tiktoken's ranks -> tokenizer.json), on our BPE's ranks."""
    with open(os.path.join(exported['bpe'][1], 'tokenizer.json'), encoding='utf-8') as f:
        _, vocab, ranks, _, merges = ds.parse_bpe(f.read(), 'test')
    rebuilt = json.loads(interop.bpe_json(ranks))
    assert [list(m) for m in rebuilt['model']['merges']] == merges and rebuilt['model']['vocab'] == vocab
    assert interop.tokenizer_of_json(interop.bpe_json({bytes([b]): b for b in range(256)}), 'x') == ds.make_state('byte')


def test_bias_false_and_options_gpt2_cannot_express(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257, padded_vocab_size=320,
                          bias=False)).eval()
    interop.write_hf(str(tmp_path), model, {'tokenizer': ds.make_state('byte')}, 'nobias')
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert (model(x, x)[0] - hf(x).logits).abs().max() < 1e-4  # zero biases compute the same
    Extended = dataclasses.make_dataclass('Extended', [('rotary', bool, False)], bases=(GPTConfig,))
    model.config = Extended(**dataclasses.asdict(model.config), rotary=True)
    with pytest.raises(Error, match='rotary=True cannot be expressed'):
        interop.hf_weights(model)
    model.config.rotary = False
    model.transformer.h[0].attn.c_attn.lora_A = torch.nn.Parameter(torch.zeros(4, 32))
    with pytest.raises(Error, match='no place for: transformer.h.0.attn.c_attn.lora_A'):
        interop.hf_weights(model)


def test_lora_checkpoint_exports_merged(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257, lora_rank=4, lora_alpha=32)).eval()
    for name, p in model.named_parameters():
        if name.endswith('lora_B'):
            torch.nn.init.normal_(p, std=0.1)  # an adapter that changes the output
    checkpoint.save(tmp_path / 'lora.safetensors', {'model': model.state_dict(), 'tokenizer': ds.make_state('byte'),
                                                    'model_args': dataclasses.asdict(model.config)})
    run('export.py', f'--ckpt={tmp_path / "lora.safetensors"}', '--format=hf', f'--out={tmp_path / "hf"}')
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf')).eval()
    x = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        assert (model(x, x)[0] - hf(x).logits).abs().max() < 1e-4


def test_nanogpt_checkpoint_import(tmp_path):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=False, vocab_size=50304, dropout=0.0)
    nano = GPT(GPTConfig(**args)).eval()  # nanoGPT's model is ours: same names, tied, its vocab padded
    with torch.no_grad():
        nano.transformer.wte.weight[50257:] = 0.5  # nanoGPT trains its padding rows
    ckpt = {'model': {'_orig_mod.' + k: v for k, v in nano.state_dict().items()}, 'model_args': args,
            'optimizer': torch.optim.AdamW(nano.parameters()).state_dict(), 'iter_num': 600,
            'best_val_loss': torch.tensor(3.25), 'config': {'dataset': 'openwebtext', 'batch_size': 12}}
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    _, state = runs.find(f'nanogpt:{tmp_path / "ckpt.pt"}', 'unused')
    assert state['tokenizer']['kind'] == 'gpt2' and state['iter_num'] == 600 and state['best_val_loss'] == 3.25
    assert state['model_args'] == dataclasses.asdict(GPTConfig(**dict(args, vocab_size=50257, padded_vocab_size=50304)))
    ours = from_state(state).eval()
    assert not ours.transformer.wte.weight[50257:].any()
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours(x, x)[0], nano(x, x)[0][..., :50257])  # its padding only changed cut-off logits
    torch.save(dict(ckpt, model_args=dict(args, vocab_size=65)), tmp_path / 'char.pt')
    with pytest.raises(Error, match='vocab_size=65'):
        runs.find(f'nanogpt:{tmp_path / "char.pt"}', 'unused')


class Payload:  # a pickle that runs code on load: mkdir(path)
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.xdist_group('interop')
def test_pickle_gpt2_and_export_errors_are_one_line(exported, tmp_path):
    torch.save({'model': {}, 'model_args': {}, 'x': Payload(str(tmp_path / 'ran'))}, tmp_path / 'evil.pt')
    env = {'HF_HOME': str(tmp_path / 'hf_home'), 'HF_HUB_OFFLINE': '1'}  # an empty cache, no network
    path, hf_dir = exported['byte']
    (tmp_path / 'taken').mkdir()
    (tmp_path / 'taken' / 'keep.txt').write_text('mine')
    cases = [('sample.py', [f'--ckpt=nanogpt:{tmp_path / "evil.pt"}'], 'weights_only=True'),
             ('sample.py', ['--ckpt=gpt2'], 'hf download openai-community/gpt2'),
             ('export.py', [f'--ckpt={path}', f'--out={path}'], 'never overwrites'),
             ('export.py', [f'--ckpt={path}', '--format=hf', f'--out={tmp_path / "taken"}'], 'not an empty directory'),
             ('export.py', [f'--ckpt={path}', '--out=x', '--push_to_hub=me/model'], 'uploads a --format=hf export'),
             ('export.py', [f'--ckpt={path}', '--format=hf', f'--out={tmp_path / "new"}', '--push_to_hub=me/model'],
              f'the export is kept in {tmp_path / "new"}')]
    for script, args, message in cases:
        p = run(script, *args, env=env, check=False)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert message in p.stderr and 'Traceback' not in p.stderr
    assert not (tmp_path / 'ran').exists()  # the pickle never ran its payload
    assert (tmp_path / 'taken' / 'keep.txt').read_text() == 'mine' and checkpoint.load(path)
    assert sorted(os.listdir(tmp_path / 'new')) == sorted(os.listdir(hf_dir))  # the upload failed, the export stays
