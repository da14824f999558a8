"""prepare.py + dataset.py on tiny corpora written here: exact round trips, tiktoken == HF ids,
cache reuse and change detection, one-line errors, and crash safety."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset  # noqa: E402
import files  # noqa: E402
import prepare  # noqa: E402
from errors import Error  # noqa: E402

KOREAN = "다람쥐 헌 쳇바퀴에 타고파. 한국어 문장도 바이트 그대로 돌아와야 합니다.\n"
EDGE = "tabs\tand\r\nCRLF, NBSP\u00a0x, NEL\u0085y, ideographic\u3000z, emoji 🦀🐍, e\u0301, 12345, it's <|endoftext|>\n"


def make_corpus(root, n=12):
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(n):
        text = (f"# document {i}\n" + f"def f{i}(x):\n    return x * {i}  # it's fine\n" * (8 + i)
                + KOREAN * (i % 3) + EDGE * (i % 2))
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        docs[f"doc{i:02d}"] = text
    return docs


def run(tmp_path, *args):
    return prepare.main([f"--data_dir={tmp_path / 'data'}", "--min_split_tokens=16", "--val_fraction=0.25", *args])


def decoded_docs(data_dir, split):
    """A split's documents, cut at the EOT id (the text '<|endoftext|>' inside a document is not it)."""
    tok = dataset.load_tokenizer(dataset.tokenizer_state(data_dir))
    ids = dataset.open_split(data_dir, split)
    ends = [i for i, t in enumerate(ids.tolist()) if t == tok.eot_id]
    assert ends and ends[-1] == len(ids) - 1
    return [tok.decode_bytes(ids[a:b]).decode("utf-8") for a, b in zip([0] + [e + 1 for e in ends], ends)]


def fake_gpt2(name):  # stands in for tiktoken's download: a byte-level encoding named gpt2
    import tiktoken
    return tiktoken.Encoding("gpt2", pat_str=dataset.GPT2_PAT, mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={dataset.EOT: 256})


@pytest.mark.parametrize("tokenizer", ["bpe", "byte", "gpt2"])
def test_round_trip_exact(tmp_path, monkeypatch, tokenizer):
    docs = make_corpus(tmp_path / "corpus")
    if tokenizer == "gpt2":
        import tiktoken
        monkeypatch.setattr(tiktoken, "get_encoding", fake_gpt2)
    meta = run(tmp_path, f"--input={tmp_path / 'corpus'}", f"--tokenizer={tokenizer}", "--vocab_size=400")
    data_dir = tmp_path / "data" / "corpus"
    assert meta["tokenizer"]["kind"] == tokenizer and dataset.read_meta(data_dir) == meta
    train, val = decoded_docs(data_dir, "train"), decoded_docs(data_dir, "val")
    assert train and val and sorted(train + val) == sorted(docs.values())  # every document, byte for byte
    assert train == [d for d in docs.values() if d in train]  # in corpus order
    assert meta["splits"]["val"]["documents"] == len(val)
    assert len(dataset.open_split(data_dir, "train")) == meta["splits"]["train"]["tokens"]


def test_bpe_tiktoken_ids_equal_hf(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    stdlib = Path(prepare.sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / f).read_text(encoding="utf-8") for f in ("argparse.py", "json/decoder.py", "textwrap.py")]
    texts += [KOREAN * 30, EDGE * 5, "Ünïcödé — «quotes» 中文字符 العربية हिन्दी\u200b\u2028 \n\n  \t\n"]
    json_text = dataset.train_bpe(iter(texts), 2000)
    tok = dataset.load_tokenizer(dataset.make_state("bpe", json_text))
    assert tok._hf is None  # tiktoken encodes
    spec = json.loads(json_text)
    spec["added_tokens"] = []
    hf = HFTokenizer.from_str(json.dumps(spec))
    samples = texts + [t[::-1] for t in texts] + ["".join(texts)[i::7] for i in range(3)]
    for text in samples:
        assert tok.encode(text) == hf.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id not in tok.encode("a <|endoftext|> b")  # ordinary text, never the special token
    # merges out of id order: tiktoken can't reproduce HF, so HF encodes (and still matches itself)
    spec = json.loads(json_text)
    spec["model"]["merges"][5], spec["model"]["merges"][9] = spec["model"]["merges"][9], spec["model"]["merges"][5]
    odd = dataset.load_tokenizer(dataset.make_state("bpe", json.dumps(spec)))
    assert odd._hf is not None
    spec["added_tokens"] = []
    assert odd.encode(texts[0]) == HFTokenizer.from_str(json.dumps(spec)).encode(texts[0]).ids


def test_cache_reuse_and_change_detection(tmp_path, capsys):
    make_corpus(tmp_path / "corpus")
    args = (f"--input={tmp_path / 'corpus'}", "--tokenizer=byte", "--dataset=c")
    first = run(tmp_path, *args)
    out = tmp_path / "data" / "c"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    t0 = time.time()
    assert run(tmp_path, *args) == first
    assert time.time() - t0 < 1.0 and "reused" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    def rebuilt(*extra):
        run(tmp_path, *args, *extra)
        return "reused" not in capsys.readouterr().out

    (tmp_path / "corpus" / "doc03.txt").write_text("changed text\n" * 50, encoding="utf-8")
    assert rebuilt()
    (tmp_path / "corpus" / "new.txt").write_text("a new document\n" * 50, encoding="utf-8")
    assert rebuilt()
    (tmp_path / "corpus" / "new.txt").unlink()
    assert rebuilt()
    assert rebuilt("--val_fraction=0.3") and not rebuilt("--val_fraction=0.3")
    assert rebuilt("--val_fraction=0.3", "--force")


def test_bad_inputs_one_line_errors(tmp_path):
    make_corpus(tmp_path / "corpus")
    good = run(tmp_path, f"--input={tmp_path / 'corpus'}", "--tokenizer=byte", "--dataset=d")
    bad = {"binary.txt": b"abc\0def", "latin1.txt": "caf\xe9\n".encode("latin-1"),
           "nokey.jsonl": b'{"text": "ok"}\n{"body": "x"}\n', "broken.jsonl": b'{"text": "ok"}\n{"text": \n'}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "empty").mkdir()
    corpus = f"--input={tmp_path / 'corpus'}"
    cases = [("missing", "missing"), ("empty", "empty"), ("binary.txt", "binary.txt"), ("latin1.txt", "latin1.txt"),
             ("nokey.jsonl", "nokey.jsonl:2"), ("broken.jsonl", "broken.jsonl:2")]
    cases = [([f"--input={tmp_path / name}"], expected) for name, expected in cases]
    cases += [([corpus, "--vocab_size=70000"], "65535"), ([corpus, "--tokenizer=nonexistent.json"], "nonexistent.json")]
    for args, expected in cases:
        with pytest.raises(Error) as e:
            run(tmp_path, *args, "--dataset=d")
        msg = str(e.value)
        assert expected in msg and "\n" not in msg, msg
    assert dataset.read_meta(tmp_path / "data" / "d") == good  # existing data untouched
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["d"]  # and no temp dirs left
    for arg in (f"--input={tmp_path / 'latin1.txt'}", "--vocab_size=70000"):  # no traceback from the script
        r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), arg, f"--data_dir={tmp_path / 'data'}"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bad_files_in_directory_are_skipped_unless_strict(tmp_path, capsys):
    make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    meta = run(tmp_path, f"--input={tmp_path / 'corpus'}", "--tokenizer=byte")
    assert list(meta["inputs"]["skipped"]) == [str(tmp_path / "corpus" / "image.png")]
    assert "1 files skipped" in capsys.readouterr().out
    with pytest.raises(Error, match="image.png"):
        run(tmp_path, f"--input={tmp_path / 'corpus'}", "--tokenizer=byte", "--strict")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.bin").write_bytes(b"\0\1\2")
    with pytest.raises(Error, match="all 1 files were skipped"):
        run(tmp_path, f"--input={tmp_path / 'only'}", "--tokenizer=byte")


def test_tiny_corpus_is_an_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words\n", encoding="utf-8")
    with pytest.raises(Error, match="corpus too small.*min_split_tokens=1025"):
        prepare.main([f"--input={tmp_path / 'tiny.txt'}", f"--data_dir={tmp_path / 'data'}", "--tokenizer=byte"])
    assert not (tmp_path / "data" / "tiny").exists()


def test_one_big_file_gets_both_splits_in_line_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PIECE_BYTES", 1000)
    lines = [f"line {i:05d} {'é' * (i % 40)}\n" for i in range(3000)]
    text = "".join(lines) + "z" * 5000 + "한" * 900  # a last line longer than a piece: cut between characters
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    meta = run(tmp_path, f"--input={tmp_path / 'book.txt'}", "--tokenizer=byte", "--val_fraction=0.1")
    tok = dataset.load_tokenizer(dataset.make_state("byte"))
    train, val = (tok.decode_bytes(dataset.open_split(tmp_path / "data" / "book", s)).decode() for s in dataset.SPLITS)
    assert meta["splits"]["val"]["pieces"] > 5 and meta["splits"]["train"]["pieces"] > 50
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 1
    assert len(train) + len(val) == len(text) + len(dataset.EOT)
    numbered = [[line for line in part.splitlines(True) if line.startswith("line ")] for part in (train, val)]
    assert all(n == sorted(n) for n in numbered)  # whole lines, in file order
    assert sorted(numbered[0] + numbered[1]) == lines  # each exactly once
    assert (train + val).count("z") == 5000 and (train + val).count("한") == 900


def test_jsonl_records_and_reused_tokenizer(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    run(tmp_path, f"--input={tmp_path / 'corpus'}", "--vocab_size=300", "--dataset=base")
    records = [{"content": t, "id": i} for i, t in enumerate(docs.values())]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n")
    meta = run(tmp_path, f"--input={tmp_path / 'chat.jsonl'}", "--text_key=content",
               f"--tokenizer={tmp_path / 'data' / 'base' / 'tokenizer.json'}")
    assert meta["tokenizer"] == dataset.read_meta(tmp_path / "data" / "base")["tokenizer"]
    train, val = (decoded_docs(tmp_path / "data" / "chat", s) for s in ("train", "val"))
    assert sorted(train + val) == sorted(docs.values())


def test_gpt2_offline_is_a_one_line_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n" * 500, encoding="utf-8")
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), f"--input={tmp_path / 'a.txt'}", "--tokenizer=gpt2",
                        f"--data_dir={tmp_path / 'data'}"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "TIKTOKEN_CACHE_DIR" in r.stderr and "Traceback" not in r.stderr


def test_killed_run_leaves_old_dataset_intact(tmp_path):
    make_corpus(tmp_path / "corpus")
    cmd = [sys.executable, str(ROOT / "prepare.py"), f"--input={tmp_path / 'corpus'}", f"--data_dir={tmp_path / 'data'}",
           "--min_split_tokens=16", "--val_fraction=0.25"]
    subprocess.run(cmd + ["--tokenizer=byte"], check=True, capture_output=True)
    out = tmp_path / "data" / "corpus"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    big = "".join(f"word{i} " * 20 + "\n" for i in range(60_000))  # ~10 MB: BPE training takes a while
    (tmp_path / "corpus" / "big.txt").write_text(big, encoding="utf-8")
    for sig in (signal.SIGINT, signal.SIGKILL):  # Ctrl-C cleans up; a kill leaves its temp dir behind
        proc = subprocess.Popen(cmd + ["--tokenizer=bpe", "--vocab_size=4000"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 30
        while not any(p.name.startswith(".corpus.tmp-") for p in (tmp_path / "data").iterdir()) and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate()
        tmp_dirs = [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".corpus.tmp-")]
        if sig == signal.SIGINT:
            assert proc.returncode == 1 and err.strip().endswith("was left as it was") and not tmp_dirs
        else:
            assert tmp_dirs  # killed mid-run
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old dataset complete and unchanged
    meta = prepare.main(cmd[2:] + ["--tokenizer=byte"])  # the next run rebuilds and sweeps the dead temp dir
    assert meta["inputs"]["files"] == 13 and [p.name for p in (tmp_path / "data").iterdir()] == ["corpus"]


def test_crash_between_publish_renames_is_undone(tmp_path):
    make_corpus(tmp_path / "corpus")
    meta = run(tmp_path, f"--input={tmp_path / 'corpus'}", "--tokenizer=byte")
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "data" / "corpus"
    out.rename(tmp_path / "data" / f".corpus.tmp-{dead.pid}.old")  # as publish() leaves it if killed midway
    files.clean_stale(out)
    assert dataset.read_meta(out) == meta


def test_default_corpus_is_the_stdlib_without_tests():
    stdlib = prepare.sysconfig.get_paths()["stdlib"]
    sources = prepare.list_sources([stdlib], "*.py", prepare.STDLIB_EXCLUDE)
    paths = [s[0] for s in sources]
    assert len(paths) > 500 and paths == sorted(paths)
    assert not any(f"/{d}/" in p for p in paths for d in ("site-packages", "test", "tests", "idle_test"))


def test_read_meta_errors_are_one_line(tmp_path):
    with pytest.raises(Error, match="not found") as e:
        dataset.read_meta(tmp_path / "nothing")
    assert "\n" not in str(e.value)
    make_corpus(tmp_path / "corpus")
    run(tmp_path, f"--input={tmp_path / 'corpus'}", "--tokenizer=byte")
    with open(tmp_path / "data" / "corpus" / "val.bin", "r+b") as f:
        f.truncate(2)
    with pytest.raises(Error, match="damaged"):
        dataset.read_meta(tmp_path / "data" / "corpus")
