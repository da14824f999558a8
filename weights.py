"""
What a saved state means for the model (model.py is the network): which weights a GPTConfig
makes, whether a state holds a GPT, an adapter put together with its base, a vocabulary grown
for new tokens, and what trains in a fine-tune. Whoever reads or writes states imports it.

    state_shapes(config) / check_args(args) / check_state(state) / check_finite(weights)
    from_state(state) / load_base(model, weights) / with_base(state, base) / resize_vocab(...)
    mark_trainable(model, trainable) / count_params(model) / trained_weights(model)

Bad states and settings raise Error with a one-line reason.
"""
import math
from dataclasses import fields, replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from errors import Error, oneline
from hardware import memory_bytes
from model import GPT, GPTConfig, pad_vocab

class SkipNormal(TorchFunctionMode):
    """Leaves normal_ (nn.init's and the tensor's) undone. A meta tensor has no values to fill, yet
    its normal_ imports torch's compiler on first use (1 s, measured), which nothing else needs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.normal_, nn.init.normal_):
            return args[0] if args else kwargs['tensor']
        return func(*args, **kwargs)


def state_shapes(config: GPTConfig) -> dict:
    """{name: shape} of GPT(config).state_dict(), read off a model built on the meta device (no
    memory, 0.13 s at GPT-2 XL size): what a checkpoint of that config must hold."""
    with torch.device('meta'), SkipNormal():
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# the sizes a model description may ask for (a crafted one could ask for a billion layers)
ARG_RANGES = dict(n_layer=1024, n_head=1024, n_embd=1 << 16, block_size=1 << 20, vocab_size=1 << 24)


def check_args(args) -> GPTConfig:
    """The GPTConfig that model_args describe; Error with a one-line reason when they describe no
    GPT: a size that is not an int in ARG_RANGES, another field not of its type (a number written as
    a string, a null where no default stands in), n_embd not a multiple of n_head, an unknown key,
    or a model whose float32 weights alone would not fit in this machine's memory. It allocates
    nothing, so every loader (runs.find's checkpoints, interop's imports) asks it first."""
    if not isinstance(args, dict):
        raise Error(f"model_args is a {type(args).__name__}, not a dict")
    for key, top in ARG_RANGES.items():
        value = args.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top):
            raise Error(f"model_args {key}={value!r}: a size is an int from 1 to {top}")
    counts = dict(padded_vocab_size=(args['vocab_size'], ARG_RANGES['vocab_size']),
                  lora_rank=(0, ARG_RANGES['n_embd']))
    for f in fields(GPTConfig):
        if f.name in ARG_RANGES or f.name not in args:
            continue  # a size (above), or absent: its default stands in
        value = args[f.name]
        if value is None and (f.default is None or f.name.startswith('lora_')):
            continue  # null where __post_init__ puts the default (model_args from before LoRA)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if f.name in counts:
            lo, hi = counts[f.name]
            if not (number and isinstance(value, int) and lo <= value <= hi):
                raise Error(f"model_args {f.name}={value!r}: expected an int from {lo} to {hi}")
        elif f.type is float:
            # dropout is a share; lora_alpha any scale
            top = 1 if f.name.endswith('dropout') else math.inf
            if not (number and 0 <= value < top):
                raise Error(f"model_args {f.name}={value!r}: expected a number in [0, {top})")
        elif f.type is bool and not isinstance(value, bool):
            raise Error(f"model_args {f.name}={value!r}: expected true or false")
    if args['n_embd'] % args['n_head']:
        raise Error(f"model_args n_embd={args['n_embd']} is not a multiple of "
                    f"n_head={args['n_head']}")
    try:
        config = GPTConfig(**args)
        params = param_count(config)
    except Exception as e:
        raise Error(f"its model_args build no model: {type(e).__name__}: "
                    f"{oneline(e)[:200]}") from None
    memory = memory_bytes()
    # refused now, not after a minute of allocating into swap or MemoryError
    if memory and params * 4 > memory:
        raise Error(f"model_args describe a GPT of {params / 1e9:,.1f}B parameters, "
                    f"{params * 4 / 2**30:,.0f} GiB in float32: more than this machine's "
                    f"{memory / 2**30:,.0f} GiB of memory")
    return config


def param_count(config: GPTConfig) -> int:
    """Parameters of GPT(config), the tied wte / lm_head once and its padding rows included: a
    one-layer model's on the meta device, its layer counted n_layer times (no memory, no time)."""
    sizes = {k: math.prod(s) for k, s in state_shapes(replace(config, n_layer=1)).items()
             if k != 'lm_head.weight'}
    layer = sum(n for k, n in sizes.items() if k.startswith('transformer.h.0.'))
    return sum(sizes.values()) + (config.n_layer - 1) * layer


def check_finite(weights):
    """Error naming the first weight that holds a nan or an infinity: such a model samples and
    exports garbage without a word (train.py stops before it would save one)."""
    for name, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise Error(f"weight {name} holds nan or inf ({int((~torch.isfinite(t)).sum()):,} of "
                        f"{t.numel():,} values): the model diverged or the file is damaged")


def check_state(state):
    """Error unless state holds a GPT: model_args that describe one (check_args), weights of
    exactly that model's names and shapes, and every weight finite (check_finite)."""
    if not isinstance(state.get('model'), dict):
        raise Error("no model")
    expected = state_shapes(check_args(state.get('model_args')))
    weights = state['model']
    for key in expected.keys() | weights.keys():
        if (not isinstance(weights.get(key), torch.Tensor)
                or tuple(weights[key].shape) != expected.get(key)):
            raise Error(f"weight {key}: {tuple(getattr(weights.get(key), 'shape', ()))} where its "
                        f"model_args make {tuple(expected[key]) if key in expected else 'none'}")
    check_finite(weights)


def with_base(state, base) -> dict:
    """An adapter state (a run with frozen weights saves only what trains) completed with the
    weights of its base state: the base's weights, its vocabulary grown to the adapter's if the run
    extended it (resize_vocab), and the adapter's own weights on top; of a wte that trained only its
    new rows (new_tokens), the new rows."""
    weights, args = base['model'], base['model_args']
    if args['vocab_size'] != state['model_args']['vocab_size']:  # the run extended the vocabulary
        weights = resize_vocab(weights, args['vocab_size'], state['model_args']['vocab_size'])
    weights = dict(weights)
    for name, t in state['model'].items():
        # new_tokens: the new rows
        if name == 'transformer.wte.weight' and t.size(0) < weights[name].size(0):
            t = torch.cat([weights[name][:-t.size(0)], t])
        weights[name] = t
    weights['lm_head.weight'] = weights['transformer.wte.weight']  # tied
    return {**state, 'model': weights}


def from_state(state) -> GPT:
    """The model a checkpoint state holds (its model_args and weights), on the CPU."""
    model = GPT(GPTConfig(**state['model_args']))
    model.load_state_dict(state['model'], strict=True)
    return model


def load_base(model, state_dict):
    """Load a base model's weights into a model with LoRA adapters, which keep their init. Every
    key but the adapters' must be there, and no other key: load_state_dict(strict=False) alone
    would also skip a misspelled or missing base weight without a word."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith(('.lora_A', '.lora_B'))]
    if missing or unexpected:
        raise Error(f"base weights do not fit the model: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}")


TRAINABLE = ('wte', 'wpe', 'ln', 'new_tokens', 'all')


def mark_trainable(model, trainable='', base_vocab_size=None):
    """Choose what trains: every LoRA adapter plus what `trainable` names, comma-separated: wte (the
    token embeddings, and so the tied lm_head), wpe, ln (every LayerNorm), new_tokens (only the wte
    rows of an extended vocabulary: ids >= base_vocab_size) or all. Everything else gets
    requires_grad False, so optim.configure_optimizers leaves it out. Call it before the optimizer,
    torch.compile and DDP, once per model."""
    names = [t.strip() for t in (trainable or '').split(',') if t.strip()]
    bad = [t for t in names if t not in TRAINABLE]
    if bad or ('new_tokens' in names and {'wte', 'all'} & set(names)):
        raise Error(f"trainable={trainable!r}: expected a comma-separated list of "
                    f"{', '.join(TRAINABLE)} (new_tokens is a part of wte: name one of them)")
    wanted = {'lora', *names, *(['wte'] if 'new_tokens' in names else [])}
    for name, p in model.named_parameters():  # the tied wte / lm_head comes once, as wte
        group = ('lora' if name.endswith(('.lora_A', '.lora_B')) else 'ln' if '.ln_' in name
                 else {'transformer.wte.weight': 'wte', 'transformer.wpe.weight': 'wpe'}.get(name))
        p.requires_grad = 'all' in names or group in wanted
    wte = model.transformer.wte.weight
    if 'new_tokens' in names:
        if base_vocab_size is None or not 0 < base_vocab_size < model.config.vocab_size:
            raise Error(f"trainable=new_tokens needs the base vocabulary size, below this model's "
                        f"{model.config.vocab_size}, got {base_vocab_size}")
        model.frozen_wte_rows = base_vocab_size
        # A zero gradient on the base rows from the first step keeps them bit-identical under
        # AdamW: both moments stay zero, so the update is 0 / (sqrt(0) + eps) = 0, and the
        # embeddings get no weight decay (optim.configure_optimizers). The hook sees the sum of the
        # wte and lm_head gradients.
        wte.register_hook(lambda g: torch.cat([torch.zeros_like(g[:base_vocab_size]),
                                               g[base_vocab_size:]]))
    if not any(p.requires_grad for p in model.parameters()):
        raise Error("nothing to train: the model has no LoRA adapters (lora_rank=0) and trainable "
                    "is empty (set trainable=all for a full fine-tune, or lora_rank > 0)")


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters, as train.py prints them: a tied tensor counts once, wte's
    padding rows not at all, and with trainable=new_tokens only wte's new rows are trainable."""
    cfg, wte = model.config, model.transformer.wte.weight
    others = [p for p in model.parameters() if p is not wte]
    trainable = sum(p.numel() for p in others if p.requires_grad)
    trainable += (cfg.vocab_size - model.frozen_wte_rows) * cfg.n_embd if wte.requires_grad else 0
    return trainable, sum(p.numel() for p in others) + cfg.vocab_size * cfg.n_embd


def resize_vocab(state_dict, vocab_size, new_vocab_size) -> dict:
    """A model state_dict of a vocab_size vocabulary with wte and the tied lm_head grown to
    new_vocab_size (plus pad_vocab's padding), to load a base checkpoint into a model whose
    tokenizer extends the base's (prepare.py --extend_vocab). Old rows stay exactly, padding rows
    are zero, and new rows start as the mean of the old rows (Hewitt 2021, "Initializing New Word
    Embeddings for Pretrained Language Models"; torchtune's default too): a new token's logit
    h . mean is then the average of the old logits, so it starts neither likely nor impossible and
    the loss does not spike, as it can when random rows of another norm dominate the softmax."""
    if new_vocab_size < vocab_size:
        raise ValueError(f"resize_vocab only grows a vocabulary: {vocab_size} -> {new_vocab_size}")
    old = state_dict['transformer.wte.weight']
    wte = old.new_zeros(pad_vocab(new_vocab_size), old.size(1))
    wte[:vocab_size] = old[:vocab_size]
    wte[vocab_size:new_vocab_size] = old[:vocab_size].float().mean(0).to(old.dtype)
    # still one tied tensor
    return {**state_dict, 'transformer.wte.weight': wte, 'lm_head.weight': wte}


def trained_weights(model) -> dict:
    """What a run with frozen weights saves of the model: the parameters that train, and of a wte
    that trains only for new_tokens its new rows (the base rows come back from the base file)."""
    rows, sd = getattr(model, 'frozen_wte_rows', 0), model.state_dict()
    return {n: sd[n][rows:] if n == 'transformer.wte.weight' else sd[n]
            for n, p in model.named_parameters() if p.requires_grad}
