"""prepare.py --extend_vocab (dataset.extend_bpe, dataset.extends) and --max_docs, on tiny corpora
written here. Run: python -m pytest tests/test_vocab.py -q"""
import json
import random
import subprocess
import sys

import pytest
from test_prepare import EDGE, KOREAN, ROOT, decoded_docs, make_corpus, run

import dataset
from errors import Error


def korean_corpus(root, n=30):
    """Korean "medical" documents: a few words that recur (for merges to find) and some rare ones."""
    rng = random.Random(0)
    words = "환자 의사 진료 진단 치료 수술 처방 약물 부작용 증상 통증 고혈압 당뇨병 혈압 검사 항생제 입원 퇴원".split()
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(n):
        lines = [" ".join(rng.choice(words) + rng.choice(["", "는", "를", "의"]) for _ in range(12)) + "." for _ in range(20)]
        text = "\n".join(lines) + "\n" + KOREAN + "".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(30)) + "\n"
        (root / f"kor{i:02d}.txt").write_text(text + EDGE * (i % 2), encoding="utf-8")
        docs[i] = text + EDGE * (i % 2)
    return docs


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """(base data dir, extended data dir, Korean documents, meta) with a 300-token base extended by 200."""
    tmp = tmp_path_factory.mktemp("vocab")
    make_corpus(tmp / "code")
    run(tmp, f"--input={tmp / 'code'}", "--vocab_size=300", "--dataset=base")
    docs = korean_corpus(tmp / "kor")
    meta = run(tmp, f"--input={tmp / 'kor'}", f"--tokenizer={tmp / 'data' / 'base' / 'tokenizer.json'}",
               "--extend_vocab=200")
    return tmp / "data" / "base", tmp / "data" / "kor", docs, meta


@pytest.mark.xdist_group('vocab_extended')  # with the fixture they share: it prepares once
def test_extended_tokenizer_keeps_base_ids_and_round_trips(extended):
    base_dir, kor_dir, docs, meta = extended
    old, new = dataset.tokenizer_state(base_dir), dataset.tokenizer_state(kor_dir)
    assert new["vocab_size"] == old["vocab_size"] + 200 == 500 and new["eot_id"] == old["eot_id"] == 299
    assert meta["tokenizer"]["extends"] == {"fingerprint": old["fingerprint"], "vocab_size": 300}
    assert meta["settings"]["extend_vocab"] == 200  # part of the cache key
    old_vocab, new_vocab = (json.loads(s["json"])["model"]["vocab"] for s in (old, new))
    assert old_vocab.items() < new_vocab.items()  # every base token keeps its id
    assert sorted(set(new_vocab.values()) - set(old_vocab.values())) == list(range(300, 500))
    train, val = decoded_docs(kor_dir, "train"), decoded_docs(kor_dir, "val")
    assert sorted(train + val) == sorted(docs.values())  # byte for byte, Korean included
    ids = dataset.open_split(kor_dir, "train")
    assert ids.max() >= 300 and (ids >= 300).mean() > 0.3  # the new tokens carry the Korean text
    # tiktoken encodes (merges still in id order past the EOT id), and agrees with HF's BPE
    from tokenizers import Tokenizer as HFTokenizer
    tok = dataset.load_tokenizer(new)
    assert tok._hf is None
    spec = json.loads(new["json"])
    spec["added_tokens"] = []
    hf = HFTokenizer.from_str(json.dumps(spec))
    rng = random.Random(1)
    unseen = [KOREAN * 3 + EDGE, "".join(rng.sample(docs[0], len(docs[0]))), docs[1][::-1], (ROOT / "model.py").read_text()]
    for text in list(docs.values()) + unseen:
        assert tok.encode(text) == hf.encode(text).ids
        assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


@pytest.mark.xdist_group('vocab_extended')
def test_extends(extended, tmp_path):
    base_dir, kor_dir, _, _ = extended
    old, new = dataset.tokenizer_state(base_dir), dataset.tokenizer_state(kor_dir)
    assert dataset.extends(new, old) and dataset.extends(old, old) and not dataset.extends(old, new)
    assert not dataset.extends(new, dataset.make_state("byte"))
    spec = json.loads(new["json"])
    spec["model"]["merges"][3], spec["model"]["merges"][4] = spec["model"]["merges"][4], spec["model"]["merges"][3]
    assert not dataset.extends(dataset.make_state("bpe", json.dumps(spec)), old)  # a base merge changed
    spec = json.loads(new["json"])
    spec["pre_tokenizer"]["trim_offsets"] = not spec["pre_tokenizer"]["trim_offsets"]
    assert not dataset.extends(dataset.make_state("bpe", json.dumps(spec)), old)  # any other setting
    # an unrelated tokenizer, trained on the new text from scratch, is refused
    make_corpus(tmp_path / "code")
    run(tmp_path, f"--input={tmp_path / 'code'}", "--vocab_size=300", "--dataset=other", "--val_fraction=0.3")
    assert not dataset.extends(new, dataset.tokenizer_state(tmp_path / "data" / "other"))


def test_extend_vocab_stops_when_pairs_run_out():
    base = dataset.train_bpe(iter(["abc abd " * 50]), 270)
    V = dataset.make_state("bpe", base)["vocab_size"]
    new = dataset.make_state("bpe", dataset.extend_bpe(base, iter(["xyz xyz wxyz"]), 100))
    assert new["vocab_size"] == V + 5  # xy, xyz, " w", " xyz", " wxyz": then every word is one token
    tok = dataset.load_tokenizer(new)
    assert tok.encode("xyz") == [V + 1] and tok.encode(" wxyz") == [V + 4]


def test_bad_inputs_one_line(tmp_path):
    make_corpus(tmp_path / "corpus")
    good = run(tmp_path, f"--input={tmp_path / 'corpus'}", "--vocab_size=300", "--dataset=d")
    base = f"--tokenizer={tmp_path / 'data' / 'd' / 'tokenizer.json'}"
    cases = [(["--extend_vocab=10"], "PATH/tokenizer.json"), (["--tokenizer=byte", "--extend_vocab=10"], "PATH/tokenizer.json"),
             ([base, "--extend_vocab=0"], "positive"), ([base, "--extend_vocab=-5"], "positive"),
             ([base, "--extend_vocab=65300"], "at most --extend_vocab=65235"), (["--max_docs=0"], "positive")]
    for args, expected in cases:
        with pytest.raises(Error) as e:
            run(tmp_path, f"--input={tmp_path / 'corpus'}", *args, "--dataset=d")
        msg = str(e.value)
        assert expected in msg and "\n" not in msg, msg
    assert dataset.read_meta(tmp_path / "data" / "d") == good  # nothing touched
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["d"]
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), f"--input={tmp_path / 'corpus'}", "--max_docs=-1",
                        f"--data_dir={tmp_path / 'data'}"], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_max_docs_caps_in_order_and_keys_the_cache(tmp_path, capsys):
    docs = make_corpus(tmp_path / "corpus")
    records = [{"text": f"record {i}\n" * 30} for i in range(10)]
    (tmp_path / "corpus" / "zz.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    args = (f"--input={tmp_path / 'corpus'}", "--tokenizer=byte", "--dataset=c")
    meta = run(tmp_path, *args, "--max_docs=5")
    kept = decoded_docs(tmp_path / "data" / "c", "train") + decoded_docs(tmp_path / "data" / "c", "val")
    assert sorted(kept) == sorted(list(docs.values())[:5]) and meta["settings"]["max_docs"] == 5
    meta = run(tmp_path, *args, "--max_docs=15")  # every file, then the first 3 records of the JSONL
    kept = decoded_docs(tmp_path / "data" / "c", "train") + decoded_docs(tmp_path / "data" / "c", "val")
    assert sorted(kept) == sorted(list(docs.values()) + [r["text"] for r in records[:3]])
    assert sum(s["documents"] for s in meta["splits"].values()) == 15
    capsys.readouterr()

    def rebuilt(*extra):
        run(tmp_path, *args, *extra)
        return "reused" not in capsys.readouterr().out

    assert not rebuilt("--max_docs=15") and rebuilt("--max_docs=5") and rebuilt() and not rebuilt()
