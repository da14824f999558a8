"""
The optimizers of a training step, by name: AdamW, and Muon for the weight matrices inside the
blocks; Muon's step on a CPU; their states saved and loaded under their names.

    configure_optimizers(model, ...)          {name: optimizer}, which train.py steps, each in turn
    state_dicts(optimizers, model)            {name: state} for a checkpoint
    load_state_dicts(optimizers, states, ...) a checkpoint's states back, or Error naming its file
    Muon                                      torch.optim.Muon, Newton-Schulz in float32 on a CPU
"""
import inspect
import math

import torch

from errors import Error, oneline

# the optimizer key: Muon for the block matrices and AdamW for the rest, or AdamW
CHOICES = ('muon', 'adamw')


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type,
                         optimizer='adamw') -> dict:
    """{name: optimizer} for a training step: {'adamw'} or, with optimizer='muon', {'adamw', 'muon'}
    (Muon only when a block matrix trains). Frozen parameters are in none (weights.mark_trainable),
    so with LoRA the state is only what trains; every trainable parameter is in exactly one group.

    AdamW decays only the 2-D matmul weights, not biases, LayerNorm gains or the embeddings (wte,
    tied to lm_head, and wpe): undecayed, trainable=new_tokens' base rows stay fixed. lora_A /
    lora_B are decayed, which pulls the model towards its base (peft and lit-gpt do so too).

    Muon (torch.optim.Muon; Jordan 2024, https://kellerjordan.github.io/posts/muon/) takes the block
    matrices that train (c_attn, c_proj, c_fc) and follows each one's momentum with its nearest
    orthogonal matrix. Embeddings, gains, biases and LoRA factors stay on AdamW, as Muon is meant:
    an embedding row's update must not mix with other rows', and an orthogonal update of each
    LoRA factor is not one of their product. adjust_lr_fn='match_rms_adamw' (Liu et al. 2025,
    https://arxiv.org/abs/2502.16982) scales its update to AdamW's RMS, so one learning rate and
    weight decay serve both (measured in docs/training.md)."""
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # registration order
    hidden = [p for n, p in params if optimizer == 'muon' and n.startswith('transformer.h.')
              and p.dim() == 2 and not n.endswith(('.lora_A', '.lora_B'))]
    rest = [p for n, p in params if not any(p is h for h in hidden)]
    decay = [p for p in rest if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in rest if p.dim() < 2 or id(p) in embeddings]
    groups = [{'params': decay, 'weight_decay': weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    # the fused CUDA kernel is much faster; it only exists for CUDA (and in newer torch)
    fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
    optimizers = {'adamw': torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                             **({'fused': True} if fused else {}))}
    if hidden:  # none train in a LoRA run that leaves the base's matrices frozen
        optimizers['muon'] = Muon(hidden, lr=learning_rate, weight_decay=weight_decay,
                                  adjust_lr_fn='match_rms_adamw')
    return optimizers


def state_dicts(optimizers, model) -> dict:
    """{name: state_dict} to save, wte's moments cut to the rows that train (wte_moments)."""
    return {name: wte_moments(opt.state_dict(), opt, model, cut=True)
            for name, opt in optimizers.items()}


def load_state_dicts(optimizers, states, model, source):
    """Load each optimizer's state saved under its name (state_dicts); Error naming source when
    one is missing or does not fit the model."""
    for name, opt in optimizers.items():
        try:
            load_state(opt, wte_moments(states[name], opt, model, cut=False))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise Error(f"{source}: its optimizer state does not fit the model "
                        f"({type(e).__name__}: {oneline(e)})") from None


def wte_moments(state, optimizer, model, cut):
    """An optimizer's state dict with wte's moments cut to the rows that train (cut=True, to save),
    or grown back (cut=False, to load) with the frozen rows' moments, which are zero
    (mark_trainable). The state of an optimizer that does not hold wte comes back as it was."""
    rows = getattr(model, 'frozen_wte_rows', 0)
    params = [p for g in optimizer.param_groups for p in g['params']]
    i = next((i for i, p in enumerate(params) if p is model.transformer.wte.weight), None)
    if not rows or i not in state['state']:
        return state
    moments = dict(state['state'][i])
    for k, t in moments.items():  # AdamW's exp_avg, exp_avg_sq; not its step
        if t.dim() == 2:
            moments[k] = t[rows:] if cut else torch.cat([t.new_zeros(rows, t.size(1)), t])
    return {**state, 'state': {**state['state'], i: moments}}


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 on a CPU (torch's bfloat16 is
    for tensor cores, and ~10x slower than float32 on a CPU: docs/training.md), torch's own step
    elsewhere. Otherwise the update is torch's (bit for bit with ns_dtype = torch.bfloat16, in
    tests/test_optim.py) and so is the state: a checkpoint moves between CPU and GPU."""
    ns_dtype = torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or any(p.device.type != 'cpu'
                                      for g in self.param_groups for p in g['params']):
            return super().step(closure)
        for group in self.param_groups:
            a, b, c = group['ns_coefficients']
            for p in group['params']:
                if p.grad is None:
                    continue
                if 'momentum_buffer' not in self.state[p]:
                    self.state[p]['momentum_buffer'] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format)
                buf = self.state[p]['momentum_buffer']
                buf.lerp_(p.grad, 1 - group['momentum'])
                update = p.grad.lerp(buf, group['momentum']) if group['nesterov'] else buf
                # (rows, cols), orthogonalised as its wide side: X X^T is the small one
                X = update.to(self.ns_dtype)
                X = X.T if p.size(0) > p.size(1) else X
                X = X.div(X.norm().clamp(min=group['eps']))  # spectral norm <= 1
                for _ in range(group['ns_steps']):
                    A = X @ X.T
                    # a X + (b A + c A^2) X
                    X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
                X = X.T if p.size(0) > p.size(1) else X
                rows, cols = p.shape
                scale = (0.2 * math.sqrt(max(rows, cols))
                         if group['adjust_lr_fn'] == 'match_rms_adamw'
                         else math.sqrt(max(1, rows / cols)))  # torch's two choices
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.add_(X, alpha=-group['lr'] * scale)


def load_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping this optimizer's implementation flags. Loading
    replaces each param group with the saved one, `fused` and `foreach` included, so a run saved on
    a CPU and resumed on a GPU would silently lose the fused kernel (and, with float16, trip over
    GradScaler's found_inf on the plain path). The flags also decide where `step` lives (on the
    device for fused), so they are set in the saved groups before loading, not after. A setting
    the saved group lacks (one from a torch version whose optimizer had fewer) keeps this
    optimizer's value rather than a KeyError in step."""
    flags = ('fused', 'foreach', 'capturable', 'differentiable')
    groups = [{**{k: v for k, v in g.items() if k != 'params'}, **saved,
               **{k: g[k] for k in flags if k in g}}
              for saved, g in zip(state['param_groups'], optimizer.param_groups)]
    optimizer.load_state_dict({**state, 'param_groups': groups})
