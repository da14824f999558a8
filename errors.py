"""
One way to fail. What the user must fix is an Error, raised where the problem is found, with that
place's context; every script prints it once, as argparse's error() does:

    raise Error(f"{path} is not a checkpoint ...")   # in any module
    sys.excepthook = errors.report                     # once, at the top of each script
    train.py: error: out/latest.safetensors is not a checkpoint ...

Anything else that escapes a script is a bug, and prints its traceback as usual.
"""
import os
import sys


class Error(Exception):
    """What the user must fix. str() is one line (one per problem), fit to print as it is."""


def oneline(e) -> str:
    """An exception as one line: an OSError's own words (its strerror), else its message."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return " ".join(text.split()) or type(e).__name__


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def report(kind, e, tb):
    """sys.excepthook of every script: an Error is 'prog: error: msg' on stderr, exit status 1.
    Under torchrun every rank meets the same bad input, so only local rank 0 says it; and a rank
    whose peer failed gets 'Connection closed by peer' from its next collective, while the failing
    rank's own line says why: that rank leaves quietly too."""
    quiet = int(os.environ.get("LOCAL_RANK", 0)) != 0
    if issubclass(kind, Error):
        if not quiet:
            prog = os.path.basename(sys.argv[0])
            print("\n".join(f"{prog}: error: {line}" for line in str(e).splitlines()),
                  file=sys.stderr, flush=True)
    elif not ("RANK" in os.environ and "by peer" in str(e)):
        sys.__excepthook__(kind, e, tb)
