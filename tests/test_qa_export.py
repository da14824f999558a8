"""The Hugging Face export of a model trained on conversations carries its template as the
tokenizer's chat template: apply_chat_template renders, and tokenizes, what training saw."""
import dataclasses

import pytest
import torch

import dataset as ds
import interop
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": "Be brief {really}."}, {"role": "user", "content": "Name one?"},
        {"role": "assistant", "content": " n1"}, {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "again n1"}]
ODD = {"system": "<s>{content}</s>\n", "user": "[Q] {{ {content} }}\n", "assistant": "[A]{content}\n"}


@pytest.mark.parametrize("template", [ds.TEMPLATE, ODD])
def test_chat_template_renders_what_training_saw(tmp_path, template):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=256, vocab_size=257))
    state = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
             "tokenizer": dict(ds.make_state("byte"), template=template)}
    interop.write_hf(str(tmp_path), model, state, "x")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = ds.load_tokenizer(state["tokenizer"])
    segments = ds.conversation(CHAT, template, "x") + [(None, True)]  # and the document's end
    ids, _ = ds.encode_segments(tok, segments)
    text = "".join(t if t is not None else ds.EOT for t, _ in segments)
    assert hf.apply_chat_template(CHAT, tokenize=False) == text
    assert list(hf.apply_chat_template(CHAT, tokenize=True, return_dict=False)) == ids.tolist()
    prompt = ds.conversation(CHAT[:2], template, "x", answer=False)  # a question, for an answer
    ids, _ = ds.encode_segments(tok, prompt)
    assert list(hf.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)) == ids.tolist()


def test_no_template_no_chat_template(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, vocab_size=257))
    state = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
             "tokenizer": ds.make_state("byte")}
    interop.write_hf(str(tmp_path), model, state, "x")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert not hf.chat_template
    assert torch.equal(torch.tensor(hf("abc")["input_ids"]), torch.tensor([97, 98, 99]))
