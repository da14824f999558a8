"""
Throughput of prepare.py on the default corpus (this Python's stdlib sources), each configuration
in a fresh child process so that its peak RSS is its own:

    python bench/bench_prepare.py              # bpe 8192, byte, cache hit, HF vs tiktoken encode
    python bench/bench_prepare.py --skip_hf    # without the slow HF encode comparison
    python bench/bench_prepare.py --input=notes/ --vocab_size=1024 --min_split_tokens=65   # another corpus

Any prepare.py --key=value (--input for another corpus, --glob, --text_key, ...) goes to every
prepare.py run. Writes into a temporary data dir, never into data/.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dataset  # noqa: E402
import errors  # noqa: E402
import prepare  # noqa: E402
from configurator import configure  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--skip_hf", action="store_true", help="skip the HF encode_batch comparison")
args, extra = parser.parse_known_args()  # the rest goes to prepare.py
sys.excepthook = errors.report  # an Error (a bad prepare.py key, say) is one line
# what prepare.py will read them as (its inputs, glob, text_key); a bad key is an error here already
opts, _ = configure(prepare.defaults, extra, repeatable={"input"})
inputs = [opts["input"]] if isinstance(opts["input"], str) else opts["input"]


def run_prepare(data_dir, *flags):
    """(wall seconds, peak RSS MB) of one prepare.py child process."""
    t0 = time.time()
    # the user's settings first: the data dir, tokenizer and dataset name are this benchmark's
    cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), *extra, f"--data_dir={data_dir}", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 reports this child's own peak RSS (RUSAGE_CHILDREN would be the max over all children)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"bench_prepare: prepare.py {' '.join(flags)} failed: {proc.stderr.read().decode().strip()}")
    return time.time() - t0, usage.ru_maxrss / 1024


data_dir = tempfile.mkdtemp(prefix="bench_prepare_")
try:
    if any(inputs):  # the files prepare.py will read
        sources = prepare.list_sources(inputs, opts["glob"] or "*", ())
        what = ", ".join(inputs)
    else:
        stdlib = prepare.sysconfig.get_paths()["stdlib"]
        sources = prepare.list_sources([stdlib], opts["glob"] or "*.py", prepare.STDLIB_EXCLUDE)
        what = f"stdlib sources ({stdlib})"
    mb = sum(s[3] for s in sources) / 1e6
    print(f"corpus: {len(sources)} files, {mb:.1f} MB, {what}; {os.cpu_count()} cores")

    for flags in [["--tokenizer=bpe", "--dataset=bpe"], ["--tokenizer=byte", "--dataset=byte"]]:
        wall, rss = run_prepare(data_dir, *flags)
        meta = dataset.read_meta(os.path.join(data_dir, flags[1].split("=")[1]))
        name = "byte" if meta["tokenizer"]["kind"] == "byte" else f"bpe {meta['tokenizer']['vocab_size']}"
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        print(f"{name:8s}: {wall:5.2f}s wall, end to end {mb / wall:5.1f} MB/s, peak RSS {rss:4.0f} MB, "
              f"{tokens:,} tokens | BPE training {meta['bpe_train_seconds']:.2f}s | encode {meta['encode_seconds']:.2f}s "
              f"at {meta['encode_mb_per_s']:.1f} MB/s, {meta['encode_tokens_per_s'] / 1e6:.2f}M tok/s")
    wall, rss = run_prepare(data_dir, "--tokenizer=bpe", "--dataset=bpe")
    print(f"cache hit: {wall:.2f}s wall (whole process), peak RSS {rss:.0f} MB")

    if not args.skip_hf:
        # the same texts through both encoders, each using all cores its own way
        from tokenizers import Tokenizer as HFTokenizer
        import json
        state = dataset.tokenizer_state(os.path.join(data_dir, "bpe"))
        tok = dataset.load_tokenizer(state)
        texts = [text for path, key, *_ in sources for _, text, _, _ in prepare.read_pieces(path, key, opts["text_key"])]
        spec = json.loads(state["json"])
        spec["added_tokens"] = []
        hf = HFTokenizer.from_str(json.dumps(spec))
        t0 = time.time()
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            tk_ids = list(pool.map(lambda t: tok.encode_batch([t])[0], texts))
        tk_s = time.time() - t0
        t0 = time.time()
        hf_ids = [e.ids for e in hf.encode_batch(texts)]
        hf_s = time.time() - t0
        same = sum(a.tolist() == b for a, b in zip(tk_ids, hf_ids))
        print(f"encode only: tiktoken {mb / tk_s:.1f} MB/s, HF encode_batch {mb / hf_s:.1f} MB/s "
              f"-> tiktoken {hf_s / tk_s:.1f}x faster; identical ids in {same}/{len(texts)} pieces")
finally:
    shutil.rmtree(data_dir, ignore_errors=True)
