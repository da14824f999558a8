"""
Files as every script handles them: written whole or not at all, checked before the work that
fills them, and read only when reading comes to an end.

    fsync(path) / write_atomic(path, text) / publish_dir(tmp, dest)   crash-safe: old or new, whole
    temp_dir(dest) / clean_stale(dest) / alive(pid)                   scratch beside dest, our pid's
    check_writable(folder, what) / check_output(path, what)           outputs, before the work
    check_input(path, what) / read_text(path, what) / not_utf8(text)  inputs a user names
    read_jsonl(path, hint)                                            a JSON Lines file's records
"""
import functools
import json
import os
import shutil
import stat

from errors import Error, oneline


def fsync(path) -> None:
    """Flush a file or a folder (a rename is durable once its folder is flushed) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, text) -> None:
    """path holds text (str or bytes), whole: written beside it, flushed, renamed over it."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb" if isinstance(text, bytes) else "w", encoding=None
                  if isinstance(text, bytes) else "utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise Error(f"cannot write {path}: {oneline(e)}") from None


def publish_dir(tmp, dest) -> None:
    """Turn the finished folder tmp into dest (replacing a dest that exists): its files flushed,
    then renames, so that a crash at any point leaves the old dest or the new one, never a mix."""
    for name in os.listdir(tmp):
        fsync(os.path.join(tmp, name))
    old = f"{tmp}.old"
    if os.path.isdir(dest) and os.listdir(dest):
        os.rename(dest, old)  # the only moment without dest; clean_stale() undoes a crash here
    os.rename(tmp, dest)  # over an empty folder, or none
    fsync(os.path.dirname(os.path.abspath(dest)))
    shutil.rmtree(old, ignore_errors=True)


def temp_dir(dest) -> str:
    """Where to build dest before publish_dir(): hidden, beside it, named by our pid."""
    parent, name = os.path.split(os.path.abspath(dest))
    return os.path.join(parent, f".{name}.tmp-{os.getpid()}")


def clean_stale(dest) -> None:
    """Remove the temp dirs of dest that dead processes left; restore an old dest that a crash
    during publish_dir() left moved aside."""
    parent, name = os.path.split(os.path.abspath(dest))
    if not os.path.isdir(parent):
        return
    prefix = f".{name}.tmp-"
    for entry in sorted(os.listdir(parent)):
        pid = entry[len(prefix):].removesuffix(".old")
        if not entry.startswith(prefix) or not pid.isdigit() or alive(int(pid)):
            continue
        path = os.path.join(parent, entry)
        if entry.endswith(".old") and not os.path.exists(dest):
            os.rename(path, dest)
        else:
            shutil.rmtree(path, ignore_errors=True)


def alive(pid) -> bool:
    """Whether process pid runs on this host (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def new_file_mode(path) -> None:
    """Give path the mode a new file of ours gets (safetensors writes its files 0600)."""
    umask = os.umask(0o22)  # os.umask is the only way to read it
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

# -----------------------------------------------------------------------------
# outputs, checked before the work that fills them, so no result is lost to a typo at the end

def probe(folder) -> None:
    """Write and remove a file in folder: OSError if it takes none (permissions, a read-only mount
    or /proc are found out by trying)."""
    path = os.path.join(folder, f".write-test-{os.getpid()}")
    with open(path, "w") as f:
        f.write("ok")
    os.remove(path)


def check_writable(folder, what) -> None:
    """Error unless folder is, or can now be made, a folder that takes a new file."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise Error(f"{what} {folder!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        probe(folder)
    except OSError as e:
        raise Error(f"cannot write to {what} {folder!r}: {oneline(e)}") from None


def check_name(path, what) -> None:
    """Error unless path is a file name: a number given for one (--json=3) is not."""
    if not isinstance(path, (str, os.PathLike)):
        raise Error(f"{what or 'a file'}: {path!r} is not a file name (quote a name that "
                    f"looks like a number: '\"{path}\"')")


def check_output(path, what, folder=False) -> None:
    """Error unless path can be written now, naming `what` (e.g. '--json=x.json'): a name that is
    not blank; nothing there, a file to replace or a device (/dev/null), but no FIFO, whose open
    would wait for a reader forever (folder=True: a folder to create, or an empty one to fill, as
    export.py --format=hf does); in an existing folder that takes a new file."""
    check_name(path, what)
    path = os.fspath(path)
    if not path.strip():
        raise Error(f"{what}: the name is blank")
    if os.path.isdir(path):
        if not folder:
            raise Error(f"{what} is a folder, not a file: name a file in it")
        if os.listdir(path):
            raise Error(f"{what} is a folder that is not empty")
    elif os.path.exists(path):
        mode = os.stat(path).st_mode
        if folder or not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            raise Error(f"{what} exists and is not a {'folder' if folder else 'regular file'}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise Error(f"{what}: the folder {parent} does not exist"
                    + (" (it is a file)" if os.path.exists(parent) else ""))
    try:
        probe(parent)
    except OSError as e:
        raise Error(f"{what}: cannot write in {parent}: {oneline(e)}") from None

# -----------------------------------------------------------------------------
# inputs a user names

@functools.cache
def pipe_device() -> int:
    """st_dev of anonymous pipes (the kernel's pipefs): how check_input tells them from FIFOs."""
    r, w = os.pipe()
    try:
        return os.fstat(r).st_dev
    finally:
        os.close(r)
        os.close(w)


def check_input(path, what='') -> None:
    """Error unless reading the file a user named comes to an end: no named pipe (FIFO), whose
    open waits for a writer that may never come, and no device. A pipe a process hands over stays
    fine: `--mcq=<(cat exam)` (/dev/fd/63) or /dev/stdin of `cat exam |` are anonymous pipes, whose
    writer is alive by then; they live on the kernel's pipefs, so st_dev tells them apart."""
    check_name(path, what)
    try:
        st = os.stat(path)
    except OSError:
        return  # open() says why, in its own words
    if stat.S_ISFIFO(st.st_mode) and st.st_dev != pipe_device():
        why = ("it is a named pipe (FIFO): reading it would wait for a writer; give the file "
               "itself, or <(cat FILE)")
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        why = "it is a device or socket, not a file"
    else:
        return
    raise Error(f"cannot read {what + ' ' if what else ''}{path}: {why}")


def read_text(path, what='') -> str:
    """A file's UTF-8 text, or Error naming the line of the first bad byte: every text file a
    user names (config files, exams, prompts, --text) comes through here."""
    check_input(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Error(f"cannot read {what + ' ' if what else ''}{path}: {oneline(e)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise Error(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                    f"save it as UTF-8") from None


def read_jsonl(path, hint='') -> list:
    """(line number, value) for each non-blank line of a JSON Lines file; Error naming the first
    line that is not JSON (hint: what to do about it, for the file in question)."""
    records = []
    for n, line in enumerate(read_text(path).split('\n'), 1):
        if line.strip():
            try:
                records.append((n, json.loads(line)))
            except ValueError as e:
                raise Error(f"{path}, line {n}: not valid JSON ({hint or e})") from None
    return records


def not_utf8(text) -> bool:
    """Whether text holds lone surrogates, which no tokenizer encodes: how bytes that are not
    UTF-8 arrive from the command line and stdin (surrogateescape), and what a JSON '\\ud800'
    escape gives."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
