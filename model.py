"""
A GPT language model in one file, written from scratch in the shape of GPT-2 / nanoGPT.

Parameter names follow GPT-2 (transformer.wte, transformer.h.N.attn.c_attn, ...), so a reader
who knows GPT-2 or nanoGPT finds every weight where they expect it, and interop.py converts to and
from Hugging Face's GPT-2 and nanoGPT's checkpoints without renaming (HF's Conv1D is transposed).
Fine-tuning adds optional LoRA adapters (LoRALinear, mark_trainable) and vocabulary growth
(resize_vocab).
References:
1) GPT-2: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
"""

import importlib.util
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from hardware import memory_bytes


LORA_TARGETS = ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')  # linears that can take an adapter


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms; False is a bit better and faster
    padded_vocab_size: int = None  # rows of wte / lm_head; None: vocab_size (see pad_vocab)
    lora_rank: int = 0  # rank of the LoRA adapters on lora_targets; 0: no adapters
    lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank (LoRA paper, section 4.1)
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = 'attn.c_attn,attn.c_proj'  # comma-separated, any of LORA_TARGETS

    def __post_init__(self):
        for f in fields(self):  # model_args of checkpoints from before LoRA: absent, or None via .get
            if f.name.startswith('lora_') and getattr(self, f.name) is None:
                setattr(self, f.name, f.default)
        self.padded_vocab_size = self.padded_vocab_size or self.vocab_size
        assert self.padded_vocab_size >= self.vocab_size
        # one spelling (a string, in LORA_TARGETS order) whether given as a string, tuple or JSON list,
        # so model_args compare equal across checkpoints
        targets = self.lora_targets.split(',') if isinstance(self.lora_targets, str) else self.lora_targets
        targets = {t.strip() for t in targets} - {''}
        if not targets <= set(LORA_TARGETS) or self.lora_rank < 0 or (self.lora_rank and not targets):
            raise ValueError(f"lora_rank={self.lora_rank}, lora_targets={self.lora_targets!r}: the rank must "
                             f"be >= 0 and the targets a non-empty comma-separated list of {', '.join(LORA_TARGETS)}")
        self.lora_targets = ','.join(t for t in LORA_TARGETS if t in targets)


def pad_vocab(vocab_size, multiple=64):
    """Rows to give wte / lm_head: the vocabulary rounded up to a multiple of 64, so the largest
    matmul (tokens x n_embd x vocab) tiles evenly on tensor cores; nanoGPT measured ~25% faster
    training with GPT-2's 50257 padded to 50304. The padding rows start at zero and never change:
    no input uses them, and their logits are cut off before the loss and before sampling."""
    return -(-vocab_size // multiple) * multiple


class LoRALinear(nn.Linear):
    """nn.Linear plus a trainable low-rank update (LoRA, Hu et al. 2021, https://arxiv.org/abs/2106.09685):
    y = x W^T + b + dropout(x) A^T B^T * alpha / rank. W and b keep nn.Linear's keys (weight, bias),
    so a base model's weights load unchanged; the adapter adds only lora_A (rank, in) and lora_B
    (out, rank). As in the paper and peft, A starts Kaiming-uniform and B at zero: an untouched
    adapter adds exactly nothing, and the first steps train B from a useful random projection A."""

    def __init__(self, in_features, out_features, bias=True, rank=8, alpha=16.0, dropout=0.0):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = alpha / rank  # alpha / rank keeps the update's size when the rank changes
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as peft does
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = super().forward(x)
        if self.lora_A is None:  # merged
            return y
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., rank)
        # scale folded into the small B and the sum into one GEMM: no extra passes over the output
        # (2.5% of a LoRA step on the python_code shape, CPU)
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), (self.lora_B * self.scale).t()).view_as(y)

    @torch.no_grad()
    def merge(self):
        """Fold B A * scale into weight and drop the adapter: from now on a plain linear, whose
        state_dict holds only weight and bias (a merged model saves as a base model)."""
        self.weight += (self.lora_B @ self.lora_A * self.scale).to(self.weight.dtype)
        self.lora_A = self.lora_B = None


def _linear(config, name, in_features, out_features):
    """The linear at `name` ('attn.c_attn', ...): a LoRALinear when config puts an adapter there."""
    if config.lora_rank and name in config.lora_targets.split(','):
        return LoRALinear(in_features, out_features, config.bias, config.lora_rank, config.lora_alpha,
                          config.lora_dropout)
    return nn.Linear(in_features, out_features, bias=config.bias)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = _linear(config, 'attn.c_attn', config.n_embd, 3 * config.n_embd)  # q, k, v
        self.c_proj = _linear(config, 'attn.c_proj', config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.block_size = config.block_size

    def forward(self, x, cache=None, pos=0):
        # cache: None (training / plain forward) or this layer's dict {'k', 'v'} of
        # (B, nh, block_size, hs) buffers; x holds the tokens at positions pos..pos+T-1
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask, causal = None, True
        if cache is not None:
            if 'k' not in cache:
                # allocate once per generate() call, in the dtype autocast chose, so decoding
                # writes into place instead of concatenating a new tensor every step
                shape = (B, self.n_head, self.block_size, C // self.n_head)
                cache['k'], cache['v'] = k.new_empty(shape), v.new_empty(shape)
            cache['k'][:, :, pos:pos + T] = k
            cache['v'][:, :, pos:pos + T] = v
            k, v = cache['k'][:, :, :pos + T], cache['v'][:, :, :pos + T]  # (B, nh, pos+T, hs)
            if pos > 0:
                # is_causal aligns its mask to the top-left, which is wrong once queries start
                # at pos; a single new token may see the whole cache, so it needs no mask at all
                causal = False
                if T > 1:
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = _linear(config, 'mlp.c_fc', config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's GELU, so GPT-2 weights behave as trained
        self.c_proj = _linear(config, 'mlp.c_proj', 4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)  # pre-LayerNorm, as in GPT-2
        x = x + self.mlp(self.ln_2(x))
        return x


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits, targets, ignore_index=-1), with less memory traffic over the (N, V)
    logits: log_softmax's output and nll_loss's zero-filled gradient are never made, and the
    gradient softmax - onehot is built in row chunks that stay in cache. On a CPU the stock
    version's passes over the logits took a fifth of a training iteration (bench/bench_train.py)."""

    @staticmethod
    def forward(ctx, logits, targets):
        valid = targets != -1
        lse = torch.cat([torch.logsumexp(c.float(), dim=-1) for c in logits.split(64)])  # (N,), in cache
        picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0].float()
        n = valid.sum()
        ctx.save_for_backward(logits, targets, lse, n)
        return ((lse - picked) * valid).sum() / n  # nan when every target is ignored, like F

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, n = ctx.saved_tensors
        scale = ((targets != -1) * (grad / n))[:, None]  # (N, 1); ignored rows get no gradient
        out = torch.empty_like(logits, dtype=torch.float32)
        for s in range(0, logits.size(0), 64):  # 64 rows of an 8192 vocab: 2 MB, in cache
            g = torch.sub(logits[s:s + 64], lse[s:s + 64, None], out=out[s:s + 64]).exp_()  # softmax
            g.scatter_add_(1, targets[s:s + 64].clamp(min=0)[:, None], -torch.ones_like(g[:, :1]))
            g.mul_(scale[s:s + 64])
        return out.to(logits.dtype), None


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.gradient_checkpointing = False  # trade compute for memory: recompute blocks in backward
        self.frozen_wte_rows = 0  # wte rows that mark_trainable(trainable='new_tokens') keeps fixed
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying (https://paperswithcode.com/method/weight-tying): one tensor, two uses
        self.lm_head.weight = self.transformer.wte.weight

        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two
        # residual branches, so this keeps the residual stream's variance from growing with depth
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():
            self.transformer.wte.weight[config.vocab_size:] = 0  # padding rows (pad_vocab)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True) -> int:
        """Parameter count. wte is counted once (it is also lm_head, a real matmul); with
        non_embedding the position embeddings are left out, since they are a lookup only."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd  # padding
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx, cache=None, pos=0):
        """Final-LayerNorm hidden states (B, T, C) for tokens idx at positions pos..pos+T-1."""
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence length {pos + T} exceeds block_size "
                             f"{self.config.block_size} (crop the input to its last "
                             f"{self.config.block_size} tokens)")
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            if cache is not None:
                x = block(x, cache[i], pos)
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: works with inputs that need no grad and keeps dropout's RNG
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids, targets may use -1 for 'ignore'.
        With targets: logits (B, T, V) and the mean cross-entropy. Without (inference):
        logits (B, 1, V) of the last position only, and loss None."""
        x = self.hidden_states(idx)
        V = self.config.vocab_size
        if targets is not None:
            logits = self.lm_head(x)[..., :V]  # without the padding columns: exact softmax and loss
            logits2d, targets1d = logits.view(-1, logits.size(-1)), targets.reshape(-1)
            if logits.device.type == 'cpu':  # memory-bound there; GPUs and torch.compile fuse F's well
                loss = CrossEntropy.apply(logits2d, targets1d)
            else:
                loss = F.cross_entropy(logits2d, targets1d, ignore_index=-1)
        else:
            # the vocab projection is the biggest matmul: only run it where it is used
            logits = self.lm_head(x[:, [-1], :])[..., :V]  # list index keeps the time dim
            loss = None
        return logits, loss

    def merge_lora(self):
        """Fold every adapter into its base weight (LoRALinear.merge): the logits stay the same and
        the state_dict becomes a plain GPT's, which config (lora_rank 0 now) describes."""
        for m in self.modules():
            if isinstance(m, LoRALinear) and m.lora_A is not None:
                m.merge()
        self.config.lora_rank = 0

    def flops_per_token(self) -> int:
        """Training FLOPs per token, fwd + bwd, as in PaLM appendix B / nanoGPT's estimate_mfu:
        6 per parameter (N = num_params(), non-embedding: wte counts because it is also lm_head)
        plus the attention scores and weighted sums. It leaves out the layernorms, softmax, GELU,
        and the embedding lookups, and the attention term assumes a full block_size context.
        A frozen weight (LoRA fine-tuning) needs no weight gradient: 4 per parameter, not 6."""
        cfg, wpe = self.config, self.transformer.wpe.weight
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad and p is not wpe)
        if not self.transformer.wte.weight.requires_grad:
            frozen -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd  # padding: not in num_params
        return 6 * self.num_params() - 2 * frozen + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).
        Call model.eval() first (dropout would make the output random). See generate_stream."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                        use_cache, generator))
        return torch.cat([idx] + new, dim=1)

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None):
        """Yield each new token batch (B, 1) as soon as it is sampled.
        temperature 0 is greedy argmax; top_k keeps the k most likely tokens; top_p keeps the
        smallest set whose probability reaches top_p (nucleus sampling). Sampling draws from
        `generator` (a torch.Generator) so a fixed seed gives the same text, cache or not."""
        B, T = idx.size()
        if T < 1 or max_new_tokens < 0:
            raise ValueError(f"generate needs a prompt of at least 1 token and max_new_tokens >= 0, "
                             f"got {T} and {max_new_tokens}")
        if temperature < 0 or (top_k is not None and top_k < 1) or \
                (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"generate needs temperature >= 0, top_k >= 1, 0 < top_p <= 1, got "
                             f"{temperature}, {top_k}, {top_p}")
        # Context window policy, the same with and without the cache so both give the same tokens:
        # the context is seq[:, s:L]; when it would exceed block_size, s jumps so that it keeps the
        # last `keep` tokens, a quarter block shorter. Why jumps: positions are learned absolute
        # embeddings, so after a one-token slide every cached key sits at the wrong position and
        # the cache must be rebuilt. Jumping a quarter block rebuilds it ("re-prefill", positions
        # restarting at 0) once per block_size // 4 tokens instead of once per token.
        bs = self.config.block_size
        keep = bs - bs // 4
        seq = idx.new_empty(B, T + max_new_tokens)  # prompt + output, filled in place
        seq[:, :T] = idx
        cache = [dict() for _ in self.transformer.h] if use_cache else None  # one dict per layer
        # A cached step reads every weight once, so on CPU it is bound by memory reads, and MKL
        # streams a (C, V) copy of the vocab projection, the largest weight, about twice as fast
        # as the (V, C) original (+30% tokens/s for the default model): copy it once per call.
        head = self.lm_head.weight[:self.config.vocab_size].t().contiguous() if idx.device.type == 'cpu' else None
        s, L = 0, T
        for i in range(max_new_tokens):
            refill = L - s > bs
            if refill:
                s = L - keep
            if not use_cache:
                x = self.hidden_states(seq[:, s:L])  # the whole window, every step
            elif i == 0 or refill:
                x = self.hidden_states(seq[:, s:L], cache, 0)  # prefill the cache
            else:
                x = self.hidden_states(seq[:, L - 1:L], cache, L - 1 - s)  # one new token vs the cache
            x = x[:, -1, :]  # only the last position's logits are needed
            logits = (x @ head if head is not None else self.lm_head(x))[:, :self.config.vocab_size]  # (B, V)
            next_tok = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            seq[:, L] = next_tok[:, 0]
            L += 1
            yield next_tok


class _SkipNormal(TorchFunctionMode):
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
    with torch.device('meta'), _SkipNormal():
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# the sizes a model description may ask for (a crafted one could ask for a billion layers)
ARG_RANGES = dict(n_layer=1024, n_head=1024, n_embd=1 << 16, block_size=1 << 20, vocab_size=1 << 24)


def check_args(args) -> GPTConfig:
    """The GPTConfig that model_args describe; ValueError with a one-line reason when they describe
    no GPT: a size that is not an int in ARG_RANGES, another field not of its type (a number written
    as a string, a null where no default stands in), n_embd not a multiple of n_head, an unknown key,
    or a model whose float32 weights alone would not fit in this machine's memory. It allocates
    nothing, so every loader (runs.find's checkpoints, interop's imports) asks it first."""
    if not isinstance(args, dict):
        raise ValueError(f"model_args is a {type(args).__name__}, not a dict")
    for key, top in ARG_RANGES.items():
        value = args.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top):
            raise ValueError(f"model_args {key}={value!r}: a size is an int from 1 to {top}")
    counts = dict(padded_vocab_size=(args['vocab_size'], ARG_RANGES['vocab_size']), lora_rank=(0, ARG_RANGES['n_embd']))
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
                raise ValueError(f"model_args {f.name}={value!r}: expected an int from {lo} to {hi}")
        elif f.type is float:
            top = 1 if f.name.endswith('dropout') else math.inf  # dropout is a share; lora_alpha any scale
            if not (number and 0 <= value < top):
                raise ValueError(f"model_args {f.name}={value!r}: expected a number in [0, {top})")
        elif f.type is bool and not isinstance(value, bool):
            raise ValueError(f"model_args {f.name}={value!r}: expected true or false")
    if args['n_embd'] % args['n_head']:
        raise ValueError(f"model_args n_embd={args['n_embd']} is not a multiple of n_head={args['n_head']}")
    try:
        config = GPTConfig(**args)
        params = param_count(config)
    except Exception as e:
        raise ValueError(f"its model_args build no model: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    memory = memory_bytes()
    if memory and params * 4 > memory:  # refused now, not after a minute of allocating into swap or MemoryError
        raise ValueError(f"model_args describe a GPT of {params / 1e9:,.1f}B parameters, {params * 4 / 2**30:,.0f} GiB "
                         f"in float32: more than this machine's {memory / 2**30:,.0f} GiB of memory")
    return config


def param_count(config: GPTConfig) -> int:
    """Parameters of GPT(config), the tied wte / lm_head once and its padding rows included: a
    one-layer model's on the meta device, its layer counted n_layer times (no memory, no time)."""
    sizes = {k: math.prod(s) for k, s in state_shapes(replace(config, n_layer=1)).items() if k != 'lm_head.weight'}
    layer = sum(n for k, n in sizes.items() if k.startswith('transformer.h.0.'))
    return sum(sizes.values()) + (config.n_layer - 1) * layer


def check_finite(weights):
    """ValueError naming the first weight that holds a nan or an infinity: such a model samples and
    exports garbage without a word (train.py stops before it would save one)."""
    for name, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"weight {name} holds nan or inf ({int((~torch.isfinite(t)).sum()):,} of {t.numel():,} "
                             f"values): the model diverged or the file is damaged")


def check_state(state):
    """ValueError unless state holds a GPT: model_args that describe one (check_args), weights of
    exactly that model's names and shapes, and every weight finite (check_finite)."""
    if not isinstance(state.get('model'), dict):
        raise ValueError("no model")
    config = check_args(state.get('model_args'))
    try:
        expected = state_shapes(config)
    except Exception as e:
        raise ValueError(f"its model_args build no model: {type(e).__name__}: {' '.join(str(e).split())}") from None
    weights = state['model']
    for key in expected.keys() | weights.keys():
        if not isinstance(weights.get(key), torch.Tensor) or tuple(weights[key].shape) != expected.get(key):
            raise ValueError(f"weight {key}: {tuple(getattr(weights.get(key), 'shape', ()))} where its model_args "
                             f"make {tuple(expected[key]) if key in expected else 'none'}")
    check_finite(weights)


def with_base(state, base) -> dict:
    """An adapter state (a run with frozen weights saves only what trains) completed with the weights
    of its base state: the base's weights, its vocabulary grown to the adapter's if the run extended it
    (resize_vocab), and the adapter's own weights on top; of a wte that trained only its new rows
    (new_tokens), the new rows."""
    weights, args = base['model'], base['model_args']
    if args['vocab_size'] != state['model_args']['vocab_size']:  # the run extended the vocabulary
        weights = resize_vocab(weights, args['vocab_size'], state['model_args']['vocab_size'])
    weights = dict(weights)
    for name, t in state['model'].items():
        if name == 'transformer.wte.weight' and t.size(0) < weights[name].size(0):  # new_tokens: the new rows
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
        raise ValueError(f"base weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


TRAINABLE = ('wte', 'wpe', 'ln', 'new_tokens', 'all')


def mark_trainable(model, trainable='', base_vocab_size=None):
    """Choose what trains: every LoRA adapter plus what `trainable` names, comma-separated:
    wte (the token embeddings, and so the tied lm_head), wpe, ln (every LayerNorm), new_tokens
    (only the wte rows of an extended vocabulary: ids >= base_vocab_size) or all. Everything else
    gets requires_grad False, so optim.configure_optimizers leaves it out. Call it before the optimizer,
    torch.compile and DDP, once per model."""
    names = [t.strip() for t in (trainable or '').split(',') if t.strip()]
    bad = [t for t in names if t not in TRAINABLE]
    if bad or ('new_tokens' in names and {'wte', 'all'} & set(names)):
        raise ValueError(f"trainable={trainable!r}: expected a comma-separated list of {', '.join(TRAINABLE)} "
                         f"(new_tokens is a part of wte: name one of them)")
    wanted = {'lora', *names, *(['wte'] if 'new_tokens' in names else [])}
    for name, p in model.named_parameters():  # the tied wte / lm_head comes once, as wte
        group = ('lora' if name.endswith(('.lora_A', '.lora_B')) else 'ln' if '.ln_' in name
                 else {'transformer.wte.weight': 'wte', 'transformer.wpe.weight': 'wpe'}.get(name))
        p.requires_grad = 'all' in names or group in wanted
    wte = model.transformer.wte.weight
    if 'new_tokens' in names:
        if base_vocab_size is None or not 0 < base_vocab_size < model.config.vocab_size:
            raise ValueError(f"trainable=new_tokens needs the base vocabulary size, below this model's "
                             f"{model.config.vocab_size}, got {base_vocab_size}")
        model.frozen_wte_rows = base_vocab_size
        # A zero gradient on the base rows from the first step keeps them bit-identical under AdamW:
        # both moments stay zero, so the update is 0 / (sqrt(0) + eps) = 0, and the embeddings get no
        # weight decay (optim.configure_optimizers). The hook sees the sum of the wte and lm_head gradients.
        wte.register_hook(lambda g: torch.cat([torch.zeros_like(g[:base_vocab_size]), g[base_vocab_size:]]))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: the model has no LoRA adapters (lora_rank=0) and trainable is "
                         "empty (set trainable=all for a full fine-tune, or lora_rank > 0)")


def fp8_problem(device):
    """Why float8 training cannot run on device (one line), or None."""
    device = torch.device(device)
    if device.type != 'cuda' or torch.cuda.get_device_capability(device) < (8, 9):
        where = torch.cuda.get_device_name(device) if device.type == 'cuda' else device
        return (f"fp8=True needs a CUDA GPU of compute capability 8.9 or newer (H100, H200, L4, L40S, RTX 4090), "
                f"not {where}")
    if importlib.util.find_spec('torchao') is None:
        return "fp8=True needs torchao: pip install torchao"
    return None


def convert_to_fp8(model):
    """Train the transformer blocks' linear layers in float8 with torchao (convert_to_float8_training,
    tensorwise scaling; needs a GPU of compute capability 8.9+). Their weights stay nn.Linear's,
    in their own dtype, under the same names: checkpoints, resume, export and sampling are as
    without it. Left as they are: LoRA adapters, lm_head (tied to wte), and a layer whose sizes are
    not multiples of 16, which float8 matmuls need. Published figures: ~1.4x on large matmuls,
    slower below ~1.5-2K width, so it is for wide models. Check fp8_problem(device) first."""
    from torchao.float8 import convert_to_float8_training  # optional: pip install torchao
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: (
        type(mod) is nn.Linear and fqn.startswith('transformer.h.') and mod.in_features % 16 == 0
        and mod.out_features % 16 == 0))


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters, as train.py prints them: a tied tensor counts once, wte's
    padding rows not at all, and with trainable=new_tokens only the new rows of wte are trainable."""
    cfg, wte = model.config, model.transformer.wte.weight
    others = [p for p in model.parameters() if p is not wte]
    trainable = sum(p.numel() for p in others if p.requires_grad)
    trainable += (cfg.vocab_size - model.frozen_wte_rows) * cfg.n_embd if wte.requires_grad else 0
    return trainable, sum(p.numel() for p in others) + cfg.vocab_size * cfg.n_embd


def resize_vocab(state_dict, vocab_size, new_vocab_size) -> dict:
    """A model state_dict of a vocab_size vocabulary with wte and the tied lm_head grown to
    new_vocab_size (plus pad_vocab's padding), to load a base checkpoint into a model whose tokenizer
    extends the base's (prepare.py --extend_vocab). Old rows stay exactly, padding rows are zero, and
    new rows start as the mean of the old rows (Hewitt 2021, "Initializing New Word Embeddings for
    Pretrained Language Models"; torchtune's default too): a new token's logit h . mean is then the
    average of the old logits, so it starts neither likely nor impossible and the loss does not
    spike, as it can when random rows of another norm dominate the softmax."""
    if new_vocab_size < vocab_size:
        raise ValueError(f"resize_vocab only grows a vocabulary: {vocab_size} -> {new_vocab_size}")
    old = state_dict['transformer.wte.weight']
    wte = old.new_zeros(pad_vocab(new_vocab_size), old.size(1))
    wte[:vocab_size] = old[:vocab_size]
    wte[vocab_size:new_vocab_size] = old[:vocab_size].float().mean(0).to(old.dtype)
    return {**state_dict, 'transformer.wte.weight': wte, 'lm_head.weight': wte}  # still one tied tensor


def trained_weights(model) -> dict:
    """What a run with frozen weights saves of the model: the parameters that train, and of a wte
    that trains only for new_tokens its new rows (the base rows come back from the base file)."""
    rows, sd = getattr(model, 'frozen_wte_rows', 0), model.state_dict()
    return {n: sd[n][rows:] if n == 'transformer.wte.weight' else sd[n]
            for n, p in model.named_parameters() if p.requires_grad}


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token id per row of logits (B, V); returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    ids = None  # candidate token ids, most likely first; None means the whole vocabulary
    if top_k is not None and top_k < logits.size(-1):
        # sample among the k candidates only
        logits, ids = torch.topk(logits, top_k, dim=-1)  # (B, k), sorted
    if top_p is not None and top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (never the top one)
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float('-inf'))
    # inverse-CDF sampling: one uniform draw per row, where torch.multinomial draws one per token
    # (over an 8192-token vocabulary that was a sizeable share of a cached decoding step on a CPU)
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)  # first cdf > u
    return choice if ids is None else ids.gather(-1, choice)
