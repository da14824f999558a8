"""
A GPT language model in one file, written from scratch in the shape of GPT-2 / nanoGPT.

Parameter names follow GPT-2 (transformer.wte, transformer.h.N.attn.c_attn, ...), so a reader
who knows GPT-2 or nanoGPT finds every weight where they expect it, and interop.py converts to and
from Hugging Face's GPT-2 and nanoGPT's checkpoints without renaming (HF's Conv1D is transposed).
Fine-tuning adds optional LoRA adapters (LoRALinear); what a saved state means for the model
(its shapes, an adapter with its base, a grown vocabulary, what trains) is weights.py's.
References:
1) GPT-2: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from errors import Error

# linears that can take an adapter
LORA_TARGETS = ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')


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
    lora_alpha: float = 16.0  # adapters scaled by lora_alpha / lora_rank (LoRA paper, section 4.1)
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = 'attn.c_attn,attn.c_proj'  # comma-separated, any of LORA_TARGETS

    def __post_init__(self):
        # model_args of checkpoints from before LoRA: absent, or None via .get
        for f in fields(self):
            if f.name.startswith('lora_') and getattr(self, f.name) is None:
                setattr(self, f.name, f.default)
        self.padded_vocab_size = self.padded_vocab_size or self.vocab_size
        assert self.padded_vocab_size >= self.vocab_size
        # one spelling (a string, in LORA_TARGETS order) whether given as a string, tuple or JSON
        # list, so model_args compare equal across checkpoints
        targets = (self.lora_targets.split(',') if isinstance(self.lora_targets, str)
                   else self.lora_targets)
        targets = {t.strip() for t in targets} - {''}
        if (not targets <= set(LORA_TARGETS) or self.lora_rank < 0
                or (self.lora_rank and not targets)):
            raise Error(f"lora_rank={self.lora_rank}, lora_targets={self.lora_targets!r}: the "
                        f"rank must be >= 0 and the targets a non-empty comma-separated list of "
                        f"{', '.join(LORA_TARGETS)}")
        self.lora_targets = ','.join(t for t in LORA_TARGETS if t in targets)


def pad_vocab(vocab_size, multiple=64):
    """Rows to give wte / lm_head: the vocabulary rounded up to a multiple of 64, so the largest
    matmul (tokens x n_embd x vocab) tiles evenly on tensor cores; nanoGPT measured ~25% faster
    training with GPT-2's 50257 padded to 50304. The padding rows start at zero and never change:
    no input uses them, and their logits are cut off before the loss and before sampling."""
    return -(-vocab_size // multiple) * multiple


class LoRALinear(nn.Linear):
    """nn.Linear plus a trainable low-rank update (LoRA, Hu et al. 2021,
    https://arxiv.org/abs/2106.09685): y = x W^T + b + dropout(x) A^T B^T * alpha / rank.
    W and b keep nn.Linear's keys (weight, bias), so a base model's weights load unchanged; the
    adapter adds only lora_A (rank, in) and lora_B (out, rank). As in the paper and peft, A starts
    Kaiming-uniform and B at zero: an untouched adapter adds exactly nothing, and the first steps
    train B from a useful random projection A."""

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
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2),
                           (self.lora_B * self.scale).t()).view_as(y)

    @torch.no_grad()
    def merge(self):
        """Fold B A * scale into weight and drop the adapter: from now on a plain linear, whose
        state_dict holds only weight and bias (a merged model saves as a base model)."""
        self.weight += (self.lora_B @ self.lora_A * self.scale).to(self.weight.dtype)
        self.lora_A = self.lora_B = None


def _linear(config, name, in_features, out_features):
    """The linear at `name` ('attn.c_attn', ...): a LoRALinear when config puts an adapter there."""
    if config.lora_rank and name in config.lora_targets.split(','):
        return LoRALinear(in_features, out_features, config.bias, config.lora_rank,
                          config.lora_alpha, config.lora_dropout)
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
    """F.cross_entropy(logits, targets, ignore_index=-1) (0 when every target is ignored), with less
    memory traffic over the (N, V) logits: log_softmax's output and nll_loss's zero-filled
    gradient are never made, and the gradient softmax - onehot is built in row chunks that stay in
    cache. On a CPU the stock version's passes over the logits took a fifth of a training
    iteration (bench/bench_train.py)."""

    @staticmethod
    def forward(ctx, logits, targets):
        valid = targets != -1
        lse = torch.cat([torch.logsumexp(c.float(), dim=-1)
                         for c in logits.split(64)])  # (N,), in cache
        picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0].float()
        n = valid.sum()
        ctx.save_for_backward(logits, targets, lse, n)
        return ((lse - picked) * valid).sum() / n.clamp(min=1)  # 0, not nan, when none counts

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, n = ctx.saved_tensors
        scale = ((targets != -1) * (grad / n.clamp(min=1)))[:, None]  # (N, 1); ignored: no gradient
        out = torch.empty_like(logits, dtype=torch.float32)
        for s in range(0, logits.size(0), 64):  # 64 rows of an 8192 vocab: 2 MB, in cache
            # softmax
            g = torch.sub(logits[s:s + 64], lse[s:s + 64, None], out=out[s:s + 64]).exp_()
            g.scatter_add_(1, targets[s:s + 64].clamp(min=0)[:, None], -torch.ones_like(g[:, :1]))
            g.mul_(scale[s:s + 64])
        return out.to(logits.dtype), None


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        # trade compute for memory: recompute blocks in backward
        self.gradient_checkpointing = False
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
        # the padding rows
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
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
        With targets: logits (B, T, V) and the mean cross-entropy over the targets that are not
        -1 (0 when none is). Without (inference): logits (B, 1, V) of the last position only, and
        loss None."""
        x = self.hidden_states(idx)
        V = self.config.vocab_size
        if targets is not None:
            logits = self.lm_head(x)[..., :V]  # without the padding columns: exact softmax and loss
            logits2d, targets1d = logits.view(-1, logits.size(-1)), targets.reshape(-1)
            # memory-bound on a CPU; GPUs and torch.compile fuse F's well
            if logits.device.type == 'cpu':
                loss = CrossEntropy.apply(logits2d, targets1d)
            else:
                counted = (targets1d != -1).sum().clamp(min=1)  # prompts only: 0, not nan
                loss = F.cross_entropy(logits2d, targets1d, ignore_index=-1,
                                       reduction='sum') / counted
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
            # padding: not in num_params
            frozen -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
        return 6 * self.num_params() - 2 * frozen + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns
        (B, T + max_new_tokens). Call model.eval() first (dropout would make the output random).
        See generate_stream."""
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
            raise ValueError(f"generate needs a prompt of at least 1 token and max_new_tokens "
                             f">= 0, got {T} and {max_new_tokens}")
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
        head = (self.lm_head.weight[:self.config.vocab_size].t().contiguous()
                if idx.device.type == 'cpu' else None)
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
                # one new token vs the cache
                x = self.hidden_states(seq[:, L - 1:L], cache, L - 1 - s)
            x = x[:, -1, :]  # only the last position's logits are needed
            logits = x @ head if head is not None else self.lm_head(x)
            logits = logits[:, :self.config.vocab_size]  # (B, V)
            next_tok = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            seq[:, L] = next_tok[:, 0]
            L += 1
            yield next_tok


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
