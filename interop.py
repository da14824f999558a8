"""
Our models in other formats, both ways: Hugging Face GPT-2 directories (transformers, lm-eval, the
Hub), GPT-2's own weights, and nanoGPT's ckpt.pt.

    write_hf(out, model, state, name)  export.py --format=hf: weights, config, tokenizer, model card
    load(name) -> (path, state)        'gpt2' .. 'gpt2-xl', 'hf:DIR', 'nanogpt:PATH' (runs.find)

Hugging Face's GPT2LMHeadModel is our GPT with other clothes: the same parameter names (under
'transformer.'), but Conv1D layers that store the four matmul weights transposed, (in, out), biases
everywhere, and lm_head tied to wte and left out of the file. An imported state is shaped like a
checkpoint (model, model_args, tokenizer, config, iter_num) and holds no training state, so train.py
starts a new run from it and sample.py samples from it as it is.
"""
import dataclasses
import hashlib
import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dataset as ds
from errors import Error, oneline
from files import new_file_mode, read_text
from model import GPTConfig, pad_vocab
from weights import check_args, state_shapes

# HF's Conv1D layout: (in, out)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
EXPRESSIBLE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "padded_vocab_size",
               "dropout", "bias")
# ds.make_state("gpt2") without needing tiktoken's file (GPT-2's vocabulary is fixed)
GPT2_TOKENIZER = dict(kind="gpt2", fingerprint="gpt2", vocab_size=50257, eot_id=50256, json=None)
NAMES = re.compile(r"gpt2(-medium|-large|-xl)?|(hf|nanogpt):.*", re.DOTALL)  # what load() takes
# vocab.bpe, as tiktoken pins it
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def load(name):
    """(path, state) of a model in another format (a name NAMES matches); Error with a one-line
    reason."""
    if name.startswith("nanogpt:"):
        return name[8:], load_nanogpt(name[8:])
    if name.startswith("hf:"):
        return name[3:], load_hf(name[3:])
    path = _gpt2_snapshot(name)
    return path, load_hf(path, tokenizer=dict(GPT2_TOKENIZER))


# -----------------------------------------------------------------------------
# export: our model -> a Hugging Face GPT-2 directory

def hf_weights(model) -> dict:
    """The model's weights as GPT2LMHeadModel's: the true vocabulary's rows, Conv1D's (in, out)
    layout, and zero biases where ours has none (bias=False computes the same as GPT-2 with zero
    biases)."""
    cfg = model.config
    for f in dataclasses.fields(cfg):
        if f.name.startswith("lora_") and not getattr(cfg, "lora_rank", 0):
            continue  # settings of adapters that are merged (model.py's LoRA): they no longer act
        if f.name not in EXPRESSIBLE and getattr(cfg, f.name) != f.default:
            raise Error(f"the model option {f.name}={getattr(cfg, f.name)!r} cannot be expressed "
                        "in GPT-2's format (refused rather than exported wrong)")
    sd = model.state_dict()
    extra = sorted(set(sd) - set(state_shapes(dataclasses.replace(cfg, lora_rank=0))))
    if extra:
        raise Error(f"the model has weights GPT-2's format has no place for: "
                    f"{', '.join(extra[:3])}")
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue  # tied to wte; GPT2LMHeadModel ties it back (tie_word_embeddings)
        if k == "transformer.wte.weight":
            v = v[:cfg.vocab_size]  # without the padding rows
        out[k] = (v.t() if k.endswith(CONV1D) else v).contiguous()
        if not cfg.bias and k.endswith(CONV1D + ("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            out[k[:-len("weight")] + "bias"] = v.new_zeros(v.shape[0])
    return out


def hf_config(cfg: GPTConfig, eot_id, dtype) -> dict:
    """config.json of a GPT2LMHeadModel computing what ours computes."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
            "activation_function": "gelu_new",  # GELU's tanh approximation, as ours
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "add_cross_attention": False, "tie_word_embeddings": True, "bos_token_id": eot_id,
            "eos_token_id": eot_id, "use_cache": True, "dtype": str(dtype).removeprefix("torch.")}


def tokenizer_json(tokenizer: dict) -> str:
    """HF tokenizers' tokenizer.json giving our token ids for any text: our BPE's own file (its
    fingerprint is the dataset's, so hf:DIR matches the data again), or the byte / GPT-2 encodings
    written out as byte-level BPEs."""
    if tokenizer["kind"] == "bpe":
        return tokenizer["json"]
    ranks = {bytes([b]): b for b in range(256)} if tokenizer["kind"] == "byte" else gpt2_ranks()
    assert tokenizer["eot_id"] == len(ranks), tokenizer
    return bpe_json(ranks)


def gpt2_ranks() -> dict:
    """{token bytes: id} of GPT-2's 50256 ordinary tokens (tiktoken's file)."""
    enc = ds.gpt2_encoding()
    return {enc.decode_single_token_bytes(i): i for i in range(enc.eot_token)}


def bpe_json(ranks: dict) -> str:
    """tokenizer.json of the byte-level BPE whose tiktoken ranks are `ranks` ({token bytes: id}),
    with the end-of-text token next. Each merge is recovered from the ranks: BPE on a token's bytes
    with only the earlier merges ends in the pair that makes it (for GPT-2 this rebuilds vocab.bpe
    exactly)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    # GPT-2 spells each byte as a printable char
    char = {b: c for c, b in ds.byte_of_char().items()}
    spell = lambda token: "".join(char[b] for b in token)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            r, i = min((ranks.get(a + b, rank), i)
                       for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if r >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((spell(parts[0]), spell(parts[1])))
    tok = Tokenizer(models.BPE(vocab={spell(t): r for t, r in ranks.items()}, merges=merges))
    # use_regex=True: the split of dataset.GPT2_PAT
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(ds.EOT, special=True, normalized=False)])
    return tok.to_str()


def write_hf(out, model, state, name):
    """Fill the empty directory `out` with a GPT-2-format model that transformers loads offline."""
    tok, cfg = state["tokenizer"], model.config
    weights = hf_weights(model)
    text = tokenizer_json(tok)
    spec = json.loads(text)
    eot = ds.EOT
    files = {
        "config.json": hf_config(cfg, tok["eot_id"], weights["transformer.wte.weight"].dtype),
        "generation_config.json": {"bos_token_id": tok["eot_id"], "eos_token_id": tok["eot_id"]},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot,
                                  "eos_token": eot, "unk_token": eot,
                                  "model_max_length": cfg.block_size, "add_prefix_space": False,
                                  "clean_up_tokenization_spaces": False,
                                  **({"chat_template": chat_template(tok["template"])}
                                     if tok.get("template") else {})},
        "special_tokens_map.json": {"bos_token": eot, "eos_token": eot, "unk_token": eot},
        # GPT-2's file pair, for older tools
        "vocab.json": {**spec["model"]["vocab"], eot: tok["eot_id"]},
    }
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    new_file_mode(os.path.join(out, "model.safetensors"))
    for fname, obj in files.items():
        with open(os.path.join(out, fname), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    merges = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    texts = {"tokenizer.json": text,
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
             "README.md": model_card(model, state, name)}
    for fname, body in texts.items():
        with open(os.path.join(out, fname), "w", encoding="utf-8") as f:
            f.write(body)


def chat_template(template) -> str:
    """transformers' chat template (Jinja) that renders a conversation as training did
    (dataset.conversation): each turn in its role's text, the end-of-text after each assistant turn,
    and with add_generation_prompt the assistant's prefix. Literal text goes in as JSON strings,
    which Jinja reads as its own string literals."""
    parts = []
    for role in ds.ROLES:
        before, after = (json.dumps(p.format()) for p in template[role].split("{content}"))
        eos = " + eos_token" if role == "assistant" else ""
        parts.append(f"{{%- {'if' if not parts else 'elif'} message['role'] == '{role}' -%}}"
                     f"{{{{ {before} + message['content'] + {after}{eos} }}}}")
    prefix = json.dumps(template["assistant"].split("{content}")[0].format())
    return ("{%- for message in messages -%}" + "".join(parts) + "{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {prefix} }}}}{{%- endif -%}}")


def model_card(model, state, name) -> str:
    """README.md for the Hub: what the model is, how it was trained, how to use and evaluate it."""
    cfg, tok = model.config, state["tokenizer"]
    data, config = state.get("data") or {}, state.get("config") or {}
    metrics = [f"{k.replace('_', ' ')} {state[k]:.4f}"
               for k in ("train_loss", "val_loss", "best_val_loss")
               if isinstance(state.get(k), (int, float))]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [gpt2, sturdygpt]", "---", "",
        f"# {name}", "",
        f"A GPT-2-architecture language model ({model.num_params(non_embedding=False) / 1e6:.2f}M "
        f"parameters: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, a context of "
        f"{cfg.block_size} tokens, a vocabulary of {cfg.vocab_size}) trained with sturdygpt and "
        f"exported by its export.py.", "",
        "## Training", "",
        f"- dataset: `{data.get('dataset', 'unknown')}`, "
        f"fingerprint `{data.get('fingerprint', 'unknown')}`",
        f"- tokenizer: `{tok['kind']}`, fingerprint `{tok['fingerprint']}`, "
        f"end of text `{ds.EOT}` = id {tok['eot_id']}",
        f"- iterations: "
        f"{state.get('iter_num') if state.get('iter_num') is not None else 'unknown'}",
        f"- metrics at export: {', '.join(metrics) or 'none recorded'}", "",
        "## Use", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tok = AutoTokenizer.from_pretrained('{name}')",
        f"model = AutoModelForCausalLM.from_pretrained('{name}')",
        "ids = tok('def add', return_tensors='pt').input_ids",
        "print(tok.decode(model.generate(ids, max_new_tokens=50, do_sample=True, top_p=0.95)[0]))",
        "```", "",
        f"Keep prompt plus output within {cfg.block_size} tokens (the learned position embeddings "
        f"end there). The tokenizer turns the text `{ds.EOT}` into the end-of-text token; in "
        f"training it was plain text.", "",
        "Evaluate with lm-evaluation-harness:", "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained={name} --tasks hellaswag --batch_size 8",
        "```", "",
        "## Training config", "", "```json", json.dumps(config, indent=2), "```", "",
    ]
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# import: GPT-2, Hugging Face directories, nanoGPT checkpoints -> a state shaped like a checkpoint

def _described(model_args, source) -> dict:
    """model_args (without padded_vocab_size) checked to describe a GPT that fits in memory
    (model.check_args), before any weight is read or allocated; then padded as ours are
    (pad_vocab)."""
    try:
        check_args(model_args)
    except Error as e:
        raise Error(f"{source} describes no GPT that can be loaded: {e}") from None
    return dict(model_args, padded_vocab_size=pad_vocab(model_args["vocab_size"]))


def _imported(sd, model_args, tokenizer, source, **info) -> dict:
    """A checkpoint-shaped state, after checking that the weights fit model_args (_described)
    exactly."""
    want, got = state_shapes(GPTConfig(**model_args)), {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:2]
        raise Error(f"{source}: the weights do not fit a GPT with {model_args} (e.g. {diff})")
    if tokenizer["vocab_size"] > model_args["vocab_size"]:
        raise Error(f"{source}: the tokenizer has {tokenizer['vocab_size']} tokens, the model only "
                    f"{model_args['vocab_size']}")
    # every field, spelled as train.py's checkpoints
    model_args = dataclasses.asdict(GPTConfig(**model_args))
    return {"model": sd, "model_args": model_args, "tokenizer": tokenizer, "config": {},
            "iter_num": None, **info}


def _tie(sd, model_args):
    """wte padded with zero rows to padded_vocab_size (model.pad_vocab), and lm_head the same
    tensor."""
    wte = sd["transformer.wte.weight"][:model_args["vocab_size"]]
    pad = wte.new_zeros(model_args["padded_vocab_size"] - wte.size(0), wte.size(1))
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = torch.cat([wte, pad])


def _read_json(path, what):
    try:
        return json.loads(read_text(path, what))
    except ValueError as e:
        raise Error(f"cannot read {what} {path}: {oneline(e)}") from None


def load_hf(d, tokenizer=None) -> dict:
    """A local GPT-2-format directory (ours, or a download): config.json, model.safetensors (or
    shards) and, unless `tokenizer` is given, tokenizer.json."""
    if not os.path.isdir(d):
        raise Error(f"{d} is not a directory (hf: takes a Hugging Face GPT-2 directory)")
    cfg = _read_json(os.path.join(d, "config.json"), "the Hugging Face config")
    if not isinstance(cfg, dict):
        raise Error(f"{d}/config.json is not a Hugging Face config (a JSON object)")
    n_embd = cfg.get("n_embd")
    # what GPT2Config can say that our GPT cannot compute
    refuse = {"model_type": cfg.get("model_type") != "gpt2",
              "activation_function": (cfg.get("activation_function", "gelu_new")
                                      not in ("gelu_new", "gelu_pytorch_tanh")),
              "n_inner": (cfg.get("n_inner")
                          not in (None, 4 * n_embd if isinstance(n_embd, int) else None)),
              "layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5) != 1e-5,
              "scale_attn_weights": not cfg.get("scale_attn_weights", True),
              "scale_attn_by_inverse_layer_idx": cfg.get("scale_attn_by_inverse_layer_idx", False),
              "add_cross_attention": cfg.get("add_cross_attention", False)}
    bad = [f"{k}={cfg.get(k)!r}" for k, no in refuse.items() if no]
    if bad:
        raise Error(f"{d}: a GPT-2 model with {', '.join(bad)} cannot be loaded as our GPT")
    try:
        model_args = dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                          block_size=cfg["n_positions"], bias=True, vocab_size=cfg["vocab_size"],
                          dropout=0.0)
    except KeyError as e:
        raise Error(f"{d}: no {e.args[0]} in config.json (not a GPT-2 model)") from None
    model_args = _described(model_args, f"{d}/config.json")
    index = os.path.join(d, "model.safetensors.index.json")
    files = (sorted(set(_read_json(index, "the weight index")["weight_map"].values()))
             if os.path.exists(index) else ["model.safetensors"])
    sd = {}
    try:
        for fname in files:
            with safe_open(os.path.join(d, fname), framework="pt") as f:
                for k in f.keys():
                    if k.endswith((".attn.bias", ".attn.masked_bias")):
                        continue  # causal-mask buffers of older transformers versions
                    v = f.get_tensor(k).float()
                    # GPT2Model's names: without 'transformer.'
                    key = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
                    sd[key] = v.t() if key.endswith(CONV1D) else v
    except Exception as e:
        raise Error(f"cannot read the weights in {d}: {oneline(e)} (a Hugging Face GPT-2 directory "
                    "holds model.safetensors; pytorch_model.bin pickles are not read)") from None
    V = model_args["vocab_size"]
    if "transformer.wte.weight" not in sd:
        raise Error(f"{d}: no transformer.wte.weight in the weights (not a GPT-2 model)")
    head = sd.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, sd["transformer.wte.weight"]):
        raise Error(f"{d}: lm_head is not tied to wte, which our GPT needs")
    if sd["transformer.wte.weight"].size(0) != V:
        raise Error(f"{d}: wte has {sd['transformer.wte.weight'].size(0)} rows, "
                    f"config.json says {V}")
    _tie(sd, model_args)
    if tokenizer is None:
        path = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(path):
            raise Error(f"{d} has no tokenizer.json (a byte-level BPE, as GPT-2's and ours are)")
        tokenizer = tokenizer_of_json(read_text(path, "the tokenizer"), path)
    return _imported(sd, model_args, tokenizer, d)


def tokenizer_of_json(text, source) -> dict:
    """Our tokenizer state for a tokenizer.json: the byte and GPT-2 encodings are recognized (so
    data prepared with --tokenizer=byte / gpt2 matches them), any other byte-level BPE is kind
    bpe."""
    _, vocab, ranks, eot_id, merges = ds.parse_bpe(text, source)
    if not merges and eot_id == 256 and ranks == {bytes([b]): b for b in range(256)}:
        return ds.make_state("byte")
    vocab_bpe = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    if (eot_id == 50256
            and hashlib.sha256(vocab_bpe.encode("utf-8")).hexdigest() == GPT2_MERGES_SHA256):
        # bytes in GPT-2's order, then one per merge
        gpt2 = {c: i for i, c in enumerate(ds.byte_of_char())}
        gpt2.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
        if vocab == gpt2:
            return dict(GPT2_TOKENIZER)
    return ds.make_state("bpe", text, source)


def _gpt2_snapshot(name):
    """The local Hugging Face cache's copy of GPT-2 `name` (config + weights), downloaded if
    missing."""
    from huggingface_hub import snapshot_download
    files = ["config.json", "model.safetensors"]
    error = None
    # the Hub's name, then the old one an older cache may hold, then the network
    for repo, local in ((f"openai-community/{name}", True), (name, True),
                        (f"openai-community/{name}", False)):
        try:
            d = snapshot_download(repo, allow_patterns=files, local_files_only=local)
        except Exception as e:  # not cached, offline, unreachable
            error = e
            continue
        if all(os.path.isfile(os.path.join(d, f)) for f in files):
            return d
    raise Error(f"GPT-2 '{name}' is not in the Hugging Face cache and could not be downloaded "
                f"({type(error).__name__}); on a machine with network run `hf download "
                f"openai-community/{name} {' '.join(files)}` and copy ~/.cache/huggingface here "
                f"(or set HF_HOME to a copy), or use hf:DIR with a directory holding those files")


def load_nanogpt(path) -> dict:
    """nanoGPT's ckpt.pt: its model_args and weights ('_orig_mod.' prefixes of compiled runs
    stripped). It is a pickle, so only torch.load(weights_only=True) reads it: tensors and plain
    values, no code. It names no tokenizer: nanoGPT uses GPT-2's unless a dataset's meta.pkl gives a
    character vocabulary, so a vocabulary of 50257 (or nanoGPT's padded 50304) is GPT-2's and any
    other is refused."""
    import pickle
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would wait for a writer forever
        raise Error(f"{path} is not a regular file (nanogpt: takes a ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()),
                   oneline(e)[:200])
        raise Error(f"{path} holds more than tensors and plain values ({why}); refused: a "
                    "nanoGPT ckpt.pt is read with torch.load(weights_only=True), which never "
                    "runs code") from None
    except Exception as e:
        raise Error(f"cannot read {path} as a torch.save file "
                    f"({type(e).__name__}: {oneline(e)[:200]})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model_args"), dict)
            and isinstance(ckpt.get("model"), dict)
            and all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())):
        raise Error(f"{path} is not a nanoGPT checkpoint (a dict with 'model' tensors and "
                    f"'model_args')")
    args = ckpt["model_args"]
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    if args.get("vocab_size") not in (50257, 50304):
        raise Error(f"{path} has vocab_size={args.get('vocab_size')} (dataset "
                    f"{config.get('dataset', 'unknown')!r}), not GPT-2's 50257 or nanoGPT's "
                    "padded 50304: its vocabulary comes from a meta.pkl (characters), which our "
                    "tokenizers cannot represent")
    try:
        model_args = {k: args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    except KeyError as e:
        raise Error(f"{path}: model_args lacks {e.args[0]} (not a nanoGPT checkpoint)") from None
    model_args = _described(dict(model_args, vocab_size=50257, dropout=0.0), path)
    sd = {k.removeprefix("_orig_mod."): v.float() for k, v in ckpt["model"].items()
          if not k.endswith(".attn.bias")}  # the causal mask nanoGPT keeps without flash attention
    if "transformer.wte.weight" not in sd:
        raise Error(f"{path}: no transformer.wte.weight among its weights (not a nanoGPT "
                    f"checkpoint)")
    # nanoGPT's padding rows were trained toward -inf logits; ours are zero and cut off
    _tie(sd, model_args)
    best = ckpt.get("best_val_loss")
    return _imported(sd, model_args, dict(GPT2_TOKENIZER), path, config=config,
                     iter_num=ckpt.get("iter_num"),
                     best_val_loss=float(best) if best is not None else None)
