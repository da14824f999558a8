"""Tests for model.py on tiny CPU models. Run: python -m pytest tests/test_model.py -q"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, sample  # noqa: E402
from optim import configure_optimizers  # noqa: E402


def tiny(block_size=16, **kw):
    torch.manual_seed(0)
    cfg = dict(block_size=block_size, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**(cfg | kw)))


@pytest.mark.parametrize("kw", [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=10),
    dict(temperature=1.2, top_p=0.9),
    dict(temperature=1.0, top_k=20, top_p=0.8),
])
@pytest.mark.parametrize("prompt_len", [3, 21])  # 21 > block_size: the prompt itself is cropped
def test_kv_cache_generation_equals_full_context(kw, prompt_len):
    # Two code paths, the same tokens: exactly, in float64. In float32 the paths' logits differ by
    # ~1e-7, so a near-tie (two top logits, or a draw at a boundary of the cumulative probabilities,
    # that close) would pick differently on some machine; in float64 they differ by ~1e-16, and no
    # decision here is that close. test_cached_step_logits_match_full_forward covers float32.
    model = tiny().double().eval()
    prompt = torch.randint(0, 64, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        outs.append(model.generate(prompt, 70, use_cache=use_cache, generator=gen, **kw))
    assert outs[0].shape == (2, prompt_len + 70)  # 70 new tokens = several quarter-block shifts
    assert torch.equal(outs[0][:, :prompt_len], prompt)
    assert torch.equal(outs[0], outs[1])


def test_generate_stream_yields_what_generate_returns():
    model = tiny().eval()
    prompt = torch.zeros(2, 1, dtype=torch.long)
    steps = list(model.generate_stream(prompt, 5, generator=torch.Generator().manual_seed(7)))
    assert len(steps) == 5 and all(s.shape == (2, 1) for s in steps)
    full = model.generate(prompt, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(full, torch.cat([prompt] + steps, dim=1))
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_sample_filters():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    best = logits.argmax(-1, keepdim=True)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(sample(logits, 0.0), best)
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g), best)
    assert torch.equal(sample(logits, 1.0, top_p=1e-6, generator=g), best)
    top3 = logits.topk(3).indices
    draws = torch.cat([sample(logits, 2.0, top_k=3, generator=g) for _ in range(50)], dim=1)
    assert (draws[..., None] == top3[:, None, :]).any(-1).all()  # never outside the top 3
    assert len(draws[0].unique()) > 1  # but not always the same one
    probs = logits.softmax(-1)  # top_p=0.5 keeps the smallest prefix reaching half the mass
    kept = (probs.sort(-1, descending=True).values.cumsum(-1) < 0.5).sum(-1) + 1
    draws = torch.cat([sample(logits, 1.0, top_p=0.5, generator=g) for _ in range(50)], dim=1)
    ranks = (probs[:, None, :] > probs.gather(-1, draws)[..., None]).sum(-1)  # 0 = most likely
    assert (ranks < kept[:, None]).all()


def test_cached_step_logits_match_full_forward():
    model = tiny(block_size=32).eval()
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(2))
    cache = [dict() for _ in model.transformer.h]

    def step(x, pos):  # logits of x's last token, placed at pos.., against the cache
        return model.lm_head(model.hidden_states(x, cache, pos)[:, -1])

    # the cache's path against the full forward's: float32 sums in another order, within 1e-5
    with torch.no_grad():
        full, _ = model(idx, targets=idx)  # (B, T, V): every position
        prefill = 5
        logits = step(idx[:, :prefill], 0)
        torch.testing.assert_close(logits, full[:, prefill - 1], atol=1e-5, rtol=1e-5)
        for t in range(prefill, 32):  # one token at a time against the cache
            logits = step(idx[:, t:t + 1], t)
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)
        # several tokens at once after the cache start (needs an explicit offset mask)
        logits = step(idx[:, 10:14], 10)
        torch.testing.assert_close(logits, full[:, 13], atol=1e-5, rtol=1e-5)
        last, _ = model(idx)  # inference forward: last position only
        assert last.shape == (2, 1, 64)
        torch.testing.assert_close(last[:, 0], full[:, -1])  # float32's default: atol 1e-5


def test_initial_loss_and_training_reduces_it():
    model = tiny()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 64, (4, 16), generator=g)
    y = torch.randint(0, 64, (4, 16), generator=g)
    _, loss0 = model(x, y)
    assert abs(loss0.item() - math.log(64)) < 0.1  # near-uniform predictions at init
    opt = configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), 'cpu')['adamw']
    for _ in range(10):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert model(x, y)[1].item() < loss0.item() - 0.5
    y[:, :8] = -1  # ignored targets do not count
    _, loss_ign = model(x, y)
    logits, _ = model(x, y)
    ref = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 64), y[:, 8:].reshape(-1))
    torch.testing.assert_close(loss_ign, ref)


def test_tied_weights_and_gpt2_names():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    keys = set(model.state_dict())
    expected = {'transformer.wte.weight', 'transformer.wpe.weight', 'transformer.ln_f.weight',
                'transformer.ln_f.bias', 'lm_head.weight'}
    for n in range(2):
        for sub in ('ln_1', 'attn.c_attn', 'attn.c_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj'):
            expected |= {f'transformer.h.{n}.{sub}.weight', f'transformer.h.{n}.{sub}.bias'}
    assert keys == expected
    nobias = tiny(bias=False)
    assert not any(k.endswith('.bias') for k in nobias.state_dict())
    # GPT-2 init: residual projections are scaled down by sqrt(2 * n_layer)
    big = tiny(n_embd=256, vocab_size=64)
    assert abs(big.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    assert abs(big.transformer.h[0].mlp.c_proj.weight.std().item() - 0.01) < 1e-3
    assert big.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_gradient_checkpointing_matches():
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    results = []
    for ckpt in (False, True):
        model = tiny(dropout=0.1)  # same init; dropout checks that the RNG state is replayed
        model.gradient_checkpointing = ckpt
        torch.manual_seed(5)
        _, loss = model(x, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_optimizer_groups():
    model = tiny()
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu')['adamw']
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay['params']}
    assert decayed == {n for n in names.values()
                       if n.endswith('.weight') and ('.attn.' in n or '.mlp.' in n)}
    assert {names[id(p)] for p in no_decay['params']} == set(names.values()) - decayed
    assert 'transformer.wte.weight' not in decayed and 'transformer.wpe.weight' not in decayed


def test_too_long_sequence_raises():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_num_params_and_flops_per_token():
    model = tiny()
    # per block 12*C^2 + 13*C = 12704; wte 64*32 = 2048; ln_f 2*32; wpe 16*32 = 512
    assert model.num_params() == 2 * 12704 + 2048 + 64
    assert model.num_params(non_embedding=False) == 2 * 12704 + 2048 + 64 + 512
    # 6 * 27520 + 12 * n_layer * n_embd * block_size = 165120 + 12288
    assert model.flops_per_token() == 177408


def test_cross_entropy_matches_torch():
    from model import CrossEntropy
    torch.manual_seed(0)
    logits = torch.randn(200, 97, requires_grad=True)
    targets = torch.randint(0, 97, (200,))
    targets[::5] = -1  # ignored positions get no loss and no gradient
    ours = CrossEntropy.apply(logits, targets)
    (g_ours,) = torch.autograd.grad(3 * ours, logits)
    ref = F.cross_entropy(logits, targets, ignore_index=-1)
    (g_ref,) = torch.autograd.grad(3 * ref, logits)
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(g_ours, g_ref, atol=1e-7)
    assert g_ours[::5].abs().max() == 0


@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(vocab_size=257, padded_vocab_size=320),
                                dict(lora_rank=4, lora_targets='attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj')])
def test_state_shapes_match_the_model(kw):
    from weights import state_shapes
    model = tiny(**kw)
    assert state_shapes(model.config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
