"""Question/answer data: prepare.py's pairs, conversations and Parquet files with a trained flag per
token, the packing of whole examples into windows, mixtures' order, and the bad records refused."""
import json
import os

import numpy as np
import pytest

import dataset as ds
from errors import Error
from test_prepare import run

PAIRS = [{"prompt": f"Q{i}: what is {i} + {i}?\n", "completion": f" {2 * i}"} for i in range(60)]
CHATS = [{"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"Name {i}?"},
                       {"role": "assistant", "content": f"n{i}"},
                       {"role": "user", "content": "Again?"},
                       {"role": "assistant", "content": f"again n{i}"}]} for i in range(60)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def examples(data, split):
    """Each example of a prepared split as (text, trained text): its tokens, and those flagged."""
    tok = ds.load_tokenizer(ds.tokenizer_state(data))
    ids, flags = ds.open_split(data, split), np.fromfile(os.path.join(data, f"{split}.mask"), np.uint8)
    starts = np.fromfile(os.path.join(data, f"{split}.idx"), np.uint64).astype(int).tolist()
    out = []
    for a, b in zip(starts, starts[1:] + [len(ids)]):
        text = tok.decode_bytes(ids[a:b]).decode()
        trained = b"".join(tok.decode_bytes([i]) if i != tok.eot_id else b"|" for i, f in
                           zip(ids[a:b], flags[a:b]) if f).decode()
        out.append((text, trained))
    return out


def test_pairs_flag_the_completion_and_its_end(tmp_path):
    meta = run(tmp_path, f"--input={write_jsonl(tmp_path / 'qa.jsonl', PAIRS)}", "--tokenizer=byte")
    data = str(tmp_path / "data" / "qa")
    assert meta["flagged"] and "template" not in meta  # pairs are rendered as they are
    got = examples(data, "train") + examples(data, "val")
    want = {(p["prompt"] + p["completion"] + "<|endoftext|>", p["completion"] + "|") for p in PAIRS}
    assert len(got) == len(PAIRS) and set(got) == want
    assert meta["splits"]["train"]["trained_tokens"] == sum(len(t) for _, t in examples(data, "train"))


def test_conversations_render_with_the_template_it_records(tmp_path):
    template = {"system": "[S] {content}\n", "user": "[U] {content}\n", "assistant": "[A] {content}"}
    (tmp_path / "t.json").write_text(json.dumps(template))
    src = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    for spec, want in (("", ds.TEMPLATE), (str(tmp_path / "t.json"), template),
                       (json.dumps(template), template)):
        meta = run(tmp_path, f"--input={src}", "--tokenizer=byte", f"--template={spec}", "--force")
        assert meta["template"] == want and ds.tokenizer_state(tmp_path / "data" / "chat")["template"] == want
    text, trained = examples(str(tmp_path / "data" / "chat"), "train")[0]
    i = int(text.split("Name ")[1].split("?")[0])
    assert text == (f"[S] Be brief.\n[U] Name {i}?\n[A] n{i}<|endoftext|>[U] Again?\n[A] again n{i}"
                    f"<|endoftext|>")
    assert trained == f"n{i}|again n{i}|"  # the assistant's contents and the end-of-text after each
    # a prompt for inference: the turns, then the assistant's prefix, nothing trained
    prompt = ds.conversation([{"role": "user", "content": "Hi"}], template, "x", answer=False)
    assert prompt == [("[U] Hi\n", False), ("[A] ", False)]


def test_plain_documents_stay_as_they_were(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i}\n" * 20} for i in range(40)])
    meta = run(tmp_path, f"--input={src}", "--tokenizer=byte")
    assert "flagged" not in meta and "template" not in meta
    assert sorted(os.listdir(tmp_path / "data" / "docs")) == ["meta.json", "train.bin", "val.bin"]
    assert set(meta["settings"]) == set(run(tmp_path, f"--input={src}", "--tokenizer=byte")["settings"])


def test_parquet_reads_like_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    for name, records in (("pairs", PAIRS), ("chats", CHATS)):
        write_jsonl(tmp_path / f"{name}.jsonl", records)
        pq.write_table(pa.Table.from_pylist(records), tmp_path / f"{name}.parquet", row_group_size=7)
        got = []
        for ext in ("jsonl", "parquet"):  # the same examples, flagged alike (the split hashes the name)
            run(tmp_path, f"--input={tmp_path / name}.{ext}", "--tokenizer=byte", f"--dataset={ext}")
            got.append(sorted(e for s in ds.SPLITS for e in examples(str(tmp_path / "data" / ext), s)))
        assert got[0] == got[1] and len(got[0]) == len(records)
    (tmp_path / "not.parquet").write_text("just text")
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "other.parquet")
    for path, expect in (("not.parquet", "not a Parquet file"), ("other.parquet", "no column 'text'")):
        with pytest.raises(Error, match=expect):
            run(tmp_path, f"--input={tmp_path / path}", "--tokenizer=byte", "--dataset=bad")
    assert not (tmp_path / "data" / "bad").exists()


@pytest.mark.parametrize("record, expect", [
    ({"body": "x"}, "no field 'text' (a document), 'prompt' and 'completion'"),
    ({"prompt": "q"}, "'completion' must be a string, got NoneType"),
    ({"prompt": 3, "completion": "a"}, "'prompt' must be a string, got int"),
    ({"prompt": "q", "completion": ""}, "'completion' is empty"),
    ({"messages": []}, "must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "a"}]},
     "role 'bot' is none of system, user, assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "the last turn is the user's"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
     "turn 1 content must be a string"),
    ("just a string", "expected a JSON object"),
])
def test_bad_records_are_one_line(tmp_path, record, expect):
    src = write_jsonl(tmp_path / "bad.jsonl", PAIRS[:5] + [record])
    with pytest.raises(Error) as e:
        run(tmp_path, f"--input={src}", "--tokenizer=byte")
    assert "bad.jsonl:6: " in str(e.value) and expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "data" / "bad").exists()


@pytest.mark.parametrize("template, expect", [
    ('{"user": "{content}", "assistant": "{content}"}', "exactly the keys system, user, assistant"),
    ('{"system": "{content}", "user": "U", "assistant": "{content}"}', "holding {content} once"),
    ('{"system": "{content}", "user": "{x} {content}", "assistant": "{content}"}', "cannot render"),
    ('{"system": "{content}", "user": "{content", "assistant": "{content}"}', "holding {content} once"),
    ("{not json", "neither a JSON file nor JSON text"),
])
def test_a_template_that_cannot_render(tmp_path, template, expect):
    src = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    with pytest.raises(Error, match=expect.replace("{", r"\{").replace("}", r"\}")):
        run(tmp_path, f"--input={src}", f"--template={template}")
    assert not (tmp_path / "data").exists() or not os.listdir(tmp_path / "data")


def test_a_few_pairs_are_enough(tmp_path):
    """Packed windows are padded, so a split of pairs needs one example, not block_size + 1 tokens
    (the default --min_split_tokens, which plain text still needs)."""
    import prepare
    pairs = write_jsonl(tmp_path / "qa.jsonl", PAIRS[:20])  # about 300 tokens in all
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": p["prompt"] + p["completion"]} for p in PAIRS[:20]])
    meta = prepare.main([f"--data_dir={tmp_path / 'data'}", f"--input={pairs}", "--tokenizer=byte"])
    assert meta["splits"]["val"]["tokens"] < 1025 and meta["splits"]["val"]["trained_tokens"] > 0
    again = prepare.main([f"--data_dir={tmp_path / 'data'}", f"--input={pairs}", "--tokenizer=byte"])
    assert again["created"] == meta["created"]  # reused, not rebuilt
    data = ds.open_dataset(str(tmp_path / "data"), "qa", 128)
    xy, counted = ds.batch([data["val"]], [(0, ds.fixed_windows(data["val"], [0])[0])], 128,
                           eot_id=256, vocab_size=257)
    assert counted > 0 and (xy[0, 128:] >= 0).sum() == counted
    with pytest.raises(Error, match="corpus too small: .* --min_split_tokens=1025"):
        prepare.main([f"--data_dir={tmp_path / 'data'}", f"--input={docs}", "--tokenizer=byte"])
    assert not (tmp_path / "data" / "docs").exists()


def flagged_part(starts, n_tokens, block_size, flags=None):
    """An open_dataset split of flagged data by hand: tokens 0..n_tokens-1, examples at starts."""
    starts = np.array(starts)
    return dict(name='qa', tokens=np.arange(n_tokens, dtype=np.uint16), block_size=block_size,
                flags=np.zeros(n_tokens, np.uint8) if flags is None else flags, starts=starts,
                lengths=np.diff(starts, append=n_tokens), packed={})


def test_packing_keeps_examples_whole():
    part = flagged_part([0, 3, 10, 12, 40], 45, 8)  # windows of 9 tokens
    assert ds.pack([3, 7, 2, 28, 5], 8) == [(0, 1, 0), (1, 2, 0), (3, 1, 0), (3, 1, 8), (3, 1, 16),
                                            (3, 1, 24), (4, 1, 0)]
    assert ds.packed(part, None) == [((0, 3),), ((3, 7), (10, 2)), ((12, 9),), ((20, 9),), ((28, 9),),
                                     ((36, 4),), ((40, 5),)]
    # every token of the long example [12, 40) is a target exactly once: windows block_size apart
    targets = [t for (a, n), in ds.packed(part, None)[2:6] for t in range(a + 1, a + n)]
    assert targets == list(range(13, 40))


def test_each_epoch_packs_the_examples_anew():
    """No answer can be learned from the examples before it: they change every epoch. Each example
    is in one window an epoch, whole; the packing is a function of (seed, epoch, dataset)."""
    lengths = np.random.default_rng(0).integers(3, 12, 200)
    part = flagged_part(np.concatenate([[0], np.cumsum(lengths)[:-1]]), int(lengths.sum()), 32)
    examples = {(int(a), int(n)) for a, n in zip(part["starts"], part["lengths"])}
    neighbours = []
    for epoch in range(3):
        windows = ds.packed(part, epoch, seed=1337)
        ranges = [r for w in windows for r in w]
        assert sorted(ranges) == sorted(examples) and all(sum(n for _, n in w) <= 33 for w in windows)
        neighbours.append({(w[k - 1], w[k]) for w in windows for k in range(1, len(w))})
    assert len(neighbours[0] & neighbours[1]) < len(neighbours[0]) / 4
    assert ds.packed(dict(part, packed={}), 1, seed=1337) == ds.packed(part, 1, seed=1337)
    assert ds.packed(dict(part, packed={}), 1, seed=1337, dataset=1) != ds.packed(part, 1, seed=1337)
    # next_windows walks the epochs: each epoch's windows once, then the next epoch's
    got, pos = ds.next_windows((0, 0), len(ds.packed(part, 0, 1337)) + 5, part, 1337)
    assert pos == (1, 5) and got[-5:] == ds.packed(part, 1, 1337)[:5]


def test_a_window_with_nothing_trained_counts_nothing():
    part = flagged_part([0, 10], 14, 9)
    picks = [(0, w) for w in ds.packed(part, None)]
    xy, counted = ds.batch([part], picks, 9, eot_id=99, vocab_size=100)
    assert counted == 0 and (xy[:, 9:] == -1).all()  # every target a prompt's: none counts
    assert ds.count_trained([part], picks, 9) == 0
    assert xy[1, :9].tolist() == [10, 11, 12, 13] + [99] * 5  # padded with end-of-text
    xy, counted = ds.batch([part], picks[1:], 9, eot_id=99, vocab_size=100, every_token=True)
    assert xy[0, 9:].tolist() == [11, 12, 13] + [-1] * 6 and counted == 3  # every real target
    assert ds.count_trained([part], picks[1:], 9, every_token=True) == 3
    # examples packed together: targets across the join, each counted as its flag says
    part = flagged_part([0, 4], 10, 12, flags=np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 1], np.uint8))
    window, = ds.packed(part, None)
    xy, counted = ds.batch([part], [(0, window)], 12, eot_id=99, vocab_size=100)
    assert xy[0, 12:].tolist() == [-1, 2, 3, -1, 5, 6, 7, -1, 9, -1, -1, -1] and counted == 6
    assert ds.count_trained([part], [(0, window)], 12) == 6
    with pytest.raises(Error, match="qa holds token id 13 but the model's vocabulary has 12 tokens"):
        ds.batch([flagged_part([0, 10], 14, 9)], picks[1:], 9, eot_id=0, vocab_size=12)


def test_mixtures_take_each_dataset_its_share_in_one_order():
    assert ds.parse_mixture("qa:0.8,stdlib:0.2") == [("qa", 0.8), ("stdlib", 0.2)]
    assert ds.parse_mixture("a:4, b:1") == [("a", 0.8), ("b", 0.2)] and ds.parse_mixture("x") == [("x", 1.0)]
    for bad, expect in (("a:0", "positive"), ("a:-1", "positive"), ("a:x", "positive"), ("a,a", "twice"),
                        ("a:0.5,", "positive"), ("a:nan", "positive"), ("a:inf", "positive")):
        with pytest.raises(Error, match=expect):
            ds.parse_mixture(bad)
    order = ds.mixture_order([(0, 0), (0, 0)], [50, 1000], [0.8, 0.2], 100)
    assert order.count(1) == 20 and all(order[k:k + 5].count(1) == 1 for k in range(0, 100, 5))
    taken = [order[:37].count(0), order[:37].count(1)]  # resumed from a saved position: the same order
    assert ds.mixture_order([(0, taken[0]), (0, taken[1])], [50, 1000], [0.8, 0.2], 63) == order[37:]
    t0 = order[:65].count(0)  # past the first dataset's first epoch of 50 windows: epochs count too
    assert t0 > 50 and ds.mixture_order([(1, t0 - 50), (0, 65 - t0)], [50, 1000], [0.8, 0.2], 3) == order[65:68]
