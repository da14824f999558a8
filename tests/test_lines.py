"""Every top-level module and script reads on a 100-column screen (STYLE: lines at most 100
characters), as nanoGPT's do."""
import glob
import os

from conftest import ROOT


def test_no_line_over_100_characters():
    long = []
    for path in sorted(glob.glob(os.path.join(ROOT, '*.py'))):
        with open(path, encoding='utf-8') as f:
            long += [f"{os.path.basename(path)}:{i}: {len(line)} characters"
                     for i, line in enumerate(f.read().splitlines(), 1) if len(line) > 100]
    assert not long, f"{len(long)} lines over 100 characters:\n" + '\n'.join(long)
