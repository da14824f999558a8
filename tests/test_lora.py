"""LoRA and vocabulary growth in model.py, on tiny CPU models. Run: python -m pytest tests/test_lora.py -q"""

import math
import os
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from errors import Error  # noqa: E402
from model import GPT, GPTConfig, LORA_TARGETS, LoRALinear, pad_vocab  # noqa: E402
from weights import count_params, from_state, load_base, mark_trainable, resize_vocab  # noqa: E402
from optim import configure_optimizers  # noqa: E402

ALL = ','.join(LORA_TARGETS)


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**(dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32) | kw)))


def batch(vocab_size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (4, 16), generator=g), torch.randint(0, vocab_size, (4, 16), generator=g)


def test_fresh_adapter_equals_base():
    base = tiny()
    lora = tiny(lora_rank=4, lora_targets=ALL)
    load_base(lora, base.state_dict())
    x, y = batch()
    assert torch.equal(lora(x, y)[0], base(x, y)[0])  # B = 0: the adapter adds exactly nothing
    extra = set(lora.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) < set(lora.state_dict())  # base keys unchanged
    assert extra == {f'transformer.h.{n}.{t}.lora_{ab}' for n in range(2) for t in LORA_TARGETS for ab in 'AB'}
    layer = lora.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.scale == 16.0 / 4
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4) and not layer.lora_B.any()
    assert 0 < layer.lora_A.abs().max() <= 1 / math.sqrt(32)  # Kaiming-uniform(a=sqrt(5)): nn.Linear's bound
    # a LoRA checkpoint state (its model_args and weights) rebuilds the same model
    again = from_state({'model_args': asdict(lora.config), 'model': lora.state_dict()})
    assert torch.equal(again(x, y)[0], base(x, y)[0])
    # only the adapters may be missing from a base state, and nothing may be extra
    sd = base.state_dict()
    with pytest.raises(Error, match='ln_f.weight'):
        load_base(lora, {k: v for k, v in sd.items() if k != 'transformer.ln_f.weight'})
    with pytest.raises(Error, match='extra'):
        load_base(lora, {**sd, 'extra': torch.zeros(1)})


def test_config_defaults_and_targets():
    old_args = {k: v for k, v in asdict(GPTConfig()).items() if not k.startswith('lora_')}
    assert GPTConfig(**old_args).lora_rank == 0  # checkpoints from before LoRA still load
    assert GPTConfig(**old_args, lora_rank=None, lora_targets=None) == GPTConfig(**old_args)
    assert not any(isinstance(m, LoRALinear) for m in tiny().modules())
    cfg = GPTConfig(lora_rank=8, lora_targets=['mlp.c_fc', ' attn.c_attn'])  # a JSON list, any order
    assert cfg.lora_targets == 'attn.c_attn,mlp.c_fc' == GPTConfig(lora_rank=8, lora_targets=cfg.lora_targets).lora_targets
    for bad in (dict(lora_targets='attn.c_atn'), dict(lora_rank=4, lora_targets=''), dict(lora_rank=-1)):
        with pytest.raises(Error, match='mlp.c_proj'):
            GPTConfig(**bad)


def test_merged_equals_unmerged():
    model = tiny(lora_rank=4, lora_targets=ALL).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.2)  # a trained adapter
    x, y = batch()
    logits = model(x, y)[0]
    assert not torch.allclose(logits, tiny()(x, y)[0], atol=1e-3)  # the adapters matter
    model.merge_lora()
    merged = model(x, y)[0]
    torch.testing.assert_close(merged, logits, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(tiny().state_dict())  # saves as a plain GPT ...
    plain = from_state({'model_args': asdict(model.config), 'model': model.state_dict()})  # ... with lora_rank 0
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert torch.equal(plain(x, y)[0], merged)


def steps(model, vocab_size=64, n=4):
    opt = configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), 'cpu')['adamw']
    for i in range(n):
        x, y = batch(vocab_size, seed=i)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py does
        opt.step()
    return opt


@pytest.mark.parametrize('trainable', ['', 'ln', 'wte,wpe'])
def test_only_adapters_and_named_params_train(trainable):
    model = tiny(lora_rank=4, dropout=0.1, lora_dropout=0.1)
    mark_trainable(model, trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in before if '.lora_' in n}
    named = {'': set(), 'wte,wpe': {'transformer.wte.weight', 'transformer.wpe.weight'},
             'ln': {n for n in before if '.ln_' in n or n.startswith('transformer.ln_f')}}[trainable]
    assert changed == lora | named  # everything else kept its exact bytes
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}  # frozen: no AdamW state
    decayed = {n for n, p in model.named_parameters() if id(p) in map(id, opt.param_groups[0]['params'])}
    assert decayed == lora
    if trainable == '':  # frozen base weights: 4 FLOPs per parameter; adapters 6; attention as before
        assert model.flops_per_token() == 4 * 27520 + 6 * 2 * (4 * 32 + 96 * 4 + 4 * 32 + 32 * 4) + 12288
    trainable_count, total = count_params(model)
    assert total == sum(p.numel() for p in model.parameters())  # vocab 64: no padding rows
    assert trainable_count == sum(before[n].numel() for n in lora | named) == sum(
        p.numel() for g in opt.param_groups for p in g['params'])


def test_new_tokens_train_only_new_rows():
    base = tiny(vocab_size=60, padded_vocab_size=64)
    model = tiny(vocab_size=100, padded_vocab_size=pad_vocab(100), lora_rank=4)
    load_base(model, resize_vocab(base.state_dict(), 60, 100))
    mark_trainable(model, 'new_tokens', base_vocab_size=60)
    wte = model.transformer.wte.weight
    before = wte.detach().clone()
    steps(model, vocab_size=100, n=6)  # real AdamW steps: weight decay, momentum, clipping
    assert model.lm_head.weight is wte
    assert torch.equal(wte[:60], before[:60])  # base rows bit-identical
    assert (wte[60:100] != before[60:100]).any(dim=1).all()  # every new row trained
    assert not wte[100:].any()  # padding rows stay zero
    lora = sum(p.numel() for n, p in model.named_parameters() if '.lora_' in n)
    assert count_params(model) == (lora + 40 * 32, sum(p.numel() for p in model.parameters()) - 28 * 32)
    for bad, base_vocab in (('new_tokens', None), ('new_tokens', 100), ('wte,new_tokens', 60), ('embeddings', 60)):
        with pytest.raises(Error, match='new_tokens'):
            mark_trainable(tiny(vocab_size=100, lora_rank=4), bad, base_vocab)
    with pytest.raises(Error, match='nothing to train'):
        mark_trainable(tiny(), '')
    mark_trainable(plain := tiny(), 'all')
    assert all(p.requires_grad for p in plain.parameters())


def test_resize_vocab_keeps_old_rows_and_uses_their_mean():
    base = tiny(vocab_size=60, padded_vocab_size=64)
    sd = base.state_dict()
    old = sd['transformer.wte.weight']
    new = resize_vocab(sd, 60, 100)
    wte = new['transformer.wte.weight']
    assert wte.shape == (128, 32) and new['lm_head.weight'] is wte and sd['transformer.wte.weight'] is old
    assert torch.equal(wte[:60], old[:60])
    torch.testing.assert_close(wte[60:100], old[:60].mean(0).expand(40, -1))  # padding rows left out of the mean
    assert not wte[100:].any()
    model = tiny(vocab_size=100, padded_vocab_size=128)
    model.load_state_dict(new, strict=True)
    x, y = batch(60)
    torch.testing.assert_close(model(x, y)[0][..., :60], base(x, y)[0])  # old tokens' logits unchanged
    with pytest.raises(ValueError, match='only grows'):
        resize_vocab(sd, 60, 50)
