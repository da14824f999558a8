"""
The optimizers of a training step: which parameters each takes (AdamW, and Muon for the weight
matrices inside the blocks), Muon's step on a CPU, and loading a saved optimizer state.

    configure_optimizers(model, ...)       the list train.py steps, each in turn
    Muon                                   torch.optim.Muon, its Newton-Schulz in float32 on a CPU
    load_optimizer_state(optimizer, state) a saved state, keeping this optimizer's kernel flags
    wte_moments(state, optimizer, model)   AdamW's wte moments cut to the rows that train, or grown back
"""
import inspect
import math

import torch


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer='adamw') -> list:
    """The optimizers of a training step, a list train.py loops over: [AdamW], or with
    optimizer='muon' [AdamW, Muon] (Muon only when a block matrix trains). Frozen parameters are in
    neither (model.mark_trainable), so with LoRA the state is only what trains; every trainable
    parameter is in exactly one group.

    AdamW decays only the 2-D matmul weights; biases, LayerNorm weights and the embeddings (wte,
    tied to lm_head, and wpe) are not decayed. lora_A / lora_B are decayed: that shrinks B A,
    pulling the model towards the base model, not towards zero (peft and lit-gpt decay them
    too). Undecayed embeddings keep trainable=new_tokens' base rows fixed.

    Muon (Muon below: torch.optim.Muon; Jordan 2024, https://kellerjordan.github.io/posts/muon/)
    takes the weight matrices inside the blocks (c_attn, c_proj, c_fc) that train: it follows each
    matrix's momentum with its nearest orthogonal matrix (Newton-Schulz), an update of the same
    size in every direction. Embeddings, the tied head, gains and biases stay on AdamW, as Muon is
    meant (an embedding row's update must not mix with other rows': the new_tokens hook relies on
    it), and so do LoRA's lora_A / lora_B: Muon's case is for a hidden weight matrix, and an
    orthogonal update of each factor is not one of their product B A; measured on a LoRA
    fine-tune (rank 8, 300 iterations, stdlib model -> IPython's sources) the two were within
    0.01 nats at each of three learning rates (docs/training.md). adjust_lr_fn='match_rms_adamw'
    (Liu et al. 2025, https://arxiv.org/abs/2502.16982) scales Muon's update to AdamW's RMS, so
    learning_rate and weight_decay mean for it what they mean for AdamW: one learning rate for both
    (a separate one for Muon, 0.5x to 2x AdamW's, moved the loss by at most 0.013 nats in the probe
    of bench/bench_recipe.py, docs/training.md)."""
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # registration order
    hidden = [p for n, p in params if optimizer == 'muon' and n.startswith('transformer.h.') and p.dim() == 2
              and not n.endswith(('.lora_A', '.lora_B'))]
    rest = [p for n, p in params if not any(p is h for h in hidden)]
    decay = [p for p in rest if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in rest if p.dim() < 2 or id(p) in embeddings]
    groups = [{'params': decay, 'weight_decay': weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    # the fused CUDA kernel is much faster; it only exists for CUDA (and in newer torch)
    use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
    extra = dict(fused=True) if use_fused else dict()
    optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)]
    if hidden:  # none train in a LoRA run that leaves the base's matrices frozen
        optimizers.append(Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn='match_rms_adamw'))
    return optimizers


def wte_moments(state, optimizer, model, cut):
    """An AdamW state dict with wte's moments cut to the rows that train (cut=True, to save), or
    grown back (cut=False, to load) with the frozen rows' moments, which are zero (mark_trainable)."""
    rows = getattr(model, 'frozen_wte_rows', 0)
    params = [p for g in optimizer.param_groups for p in g['params']]
    i = next((i for i, p in enumerate(params) if p is model.transformer.wte.weight), None)
    if not rows or i not in state['state']:
        return state
    moments = dict(state['state'][i])
    for k in ('exp_avg', 'exp_avg_sq'):
        t = moments[k]
        moments[k] = t[rows:] if cut else torch.cat([t.new_zeros(rows, t.size(1)), t])
    return {**state, 'state': {**state['state'], i: moments}}


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 on a CPU, torch's own step
    elsewhere. torch orthogonalises in bfloat16, which tensor cores make fast; a CPU without
    AVX512-BF16 multiplies bfloat16 ~10x slower than float32 (a 128x512 by 512x128 product: 2.8 ms
    against 0.27 ms), and on the default model (1 thread) torch's step made an iteration 22% slower
    than AdamW's, this one 3%. The update is torch's otherwise: with ns_dtype = torch.bfloat16 it is
    bit-identical (tests/test_optim.py), and the state is the same, so a checkpoint moves between
    CPU and GPU."""
    ns_dtype = torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or any(p.device.type != 'cpu' for g in self.param_groups for p in g['params']):
            return super().step(closure)
        for group in self.param_groups:
            a, b, c = group['ns_coefficients']
            for p in group['params']:
                if p.grad is None:
                    continue
                if 'momentum_buffer' not in self.state[p]:
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = self.state[p]['momentum_buffer']
                buf.lerp_(p.grad, 1 - group['momentum'])
                update = p.grad.lerp(buf, group['momentum']) if group['nesterov'] else buf
                X = update.to(self.ns_dtype)  # (rows, cols), orthogonalised as its wide side: X X^T is the small one
                X = X.T if p.size(0) > p.size(1) else X
                X = X.div(X.norm().clamp(min=group['eps']))  # spectral norm <= 1
                for _ in range(group['ns_steps']):
                    A = X @ X.T
                    X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A^2) X
                X = X.T if p.size(0) > p.size(1) else X
                rows, cols = p.shape
                scale = (0.2 * math.sqrt(max(rows, cols)) if group['adjust_lr_fn'] == 'match_rms_adamw'
                         else math.sqrt(max(1, rows / cols)))  # torch's two choices
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.add_(X, alpha=-group['lr'] * scale)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping this optimizer's implementation flags. Loading
    replaces each param group with the saved one, `fused` and `foreach` included, so a run saved on
    a CPU and resumed on a GPU would silently lose the fused kernel (and, with float16, trip over
    GradScaler's found_inf on the plain path). The flags also decide where `step` lives (on the
    device for fused), so they are set in the saved groups before loading, not after. A setting
    the saved group lacks (one from a torch version whose optimizer had fewer) keeps this
    optimizer's value rather than a KeyError in step."""
    flags = ('fused', 'foreach', 'capturable', 'differentiable')
    groups = [{**{k: v for k, v in g.items() if k != 'params'}, **saved, **{k: g[k] for k in flags if k in g}}
              for saved, g in zip(state['param_groups'], optimizer.param_groups)]
    optimizer.load_state_dict({**state, 'param_groups': groups})
