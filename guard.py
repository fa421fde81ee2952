"""
The scripts' edges, in the standard library only so that it loads before anything heavy: one error boundary
(run_main) and one way to write a file (write_file). Each script imports it first, before
anything else, and ends with `guard.run_main(main)`: importing it into a script run as a program (not into
tests or another script) makes SIGINT and SIGTERM exit quietly from that first line on.
Whatever escapes main becomes one line and a non-zero exit, never a traceback (TINYMOE_TRACEBACK=1 shows
one for an unexpected error, a bug):

    UserError (configurator.py)          error: <its text>                                   1
    OSError (disk full, read-only, ...)  error: cannot write PATH: <strerror>                1
    out of memory (host or GPU)          error: out of memory while <phase>: lower <knobs>   1
    BrokenPipeError (`| head`, >&-)      nothing                                             1 (as Python's docs do)
    KeyboardInterrupt, SIGINT, SIGTERM   interrupted[: <what was kept>]                      130
"""

import errno
import os
import signal
import sys
from contextlib import contextmanager

TMP_PREFIX = ".tinymoe-tmp-"  # write_file's temporary files: a killed run's leftovers are recognisable by it
_phase = ["running", "lower the model or batch knobs"]  # what the script does now, for an out-of-memory line


def _exit_at_once(signum, frame):
    """While the script loads (or after main has ended): nothing to save, so one line and out, no traceback."""
    try:
        os.write(2, b"interrupted\n")
    finally:
        os._exit(130)


def _raise_interrupt(signum, frame):
    """While main runs: SIGTERM takes the same path as Ctrl-C (a KeyboardInterrupt), so every cleanup runs."""
    raise KeyboardInterrupt


def install():
    """SIGINT and SIGTERM exit quietly from here on (a signal the process inherited as ignored stays ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _exit_at_once)


def worker_signals():
    """In a worker process (multiprocessing.Pool's initializer): Ctrl-C is the main process's to handle, and
    SIGTERM (Pool.terminate) ends the worker silently."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _running_a_script():
    """Whether the program is one of the scripts beside this file (python train.py), not pytest or a notebook."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.dirname(os.path.abspath(main_file)) == os.path.dirname(os.path.abspath(__file__))


if _running_a_script():
    install()


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the code inside has finished (a rename and its cleanup that must not stop
    half-way), then raise KeyboardInterrupt if one came. Main thread only, as Python's signal handlers are."""
    came = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(sig, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if came:
        raise KeyboardInterrupt


@contextmanager
def phase(what, knobs):
    """Name what the code inside does and which knobs size it: an out-of-memory error there says
    'out of memory while <what>: lower <knobs>'."""
    previous = list(_phase)
    _phase[:] = [what, knobs]
    yield  # an error inside leaves the phase named, for run_main to report
    _phase[:] = previous


def is_out_of_memory(e):
    """MemoryError (numpy too), torch.OutOfMemoryError (CUDA, MPS), or the RuntimeError of torch's CPU allocator."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                            or "out of memory" in text.lower())


def os_error_line(e):
    """'cannot write out/ckpt.pt: No space left on device': the file and the reason of an OSError."""
    reason = e.strerror or str(e) or type(e).__name__
    writing = e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)
    if e.filename is None:
        return f"cannot {'write' if writing else 'read or write'} a file: {reason}"
    verb = "write" if writing or e.errno in (errno.EACCES, errno.EPERM) else "use"
    target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    return f"cannot {verb} {target}: {reason}"


def _quiet_stdout():
    """After a broken pipe, point stdout at /dev/null so that the flush at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _say(line):
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed too: the exit status says it
        pass


def run_main(main, argv=None):
    """Call main(argv) and end the process: every way out is one line on stderr and an exit status."""
    from configurator import UserError

    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _raise_interrupt)):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, handler)
    status = 0
    try:
        try:
            main(sys.argv[1:] if argv is None else argv)
            sys.stdout.flush()
        finally:  # a signal while the error below is reported must not start a traceback
            install()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            _say(e.code)
    except KeyboardInterrupt as e:
        _say(f"interrupted: {e}" if str(e) else "interrupted")
        status = 130
    except UserError as e:
        _say(f"error: {e}")
        status = 1
    except BrokenPipeError:
        _quiet_stdout()
        status = 1
    except Exception as e:
        if isinstance(e, OSError):
            line = os_error_line(e)
        elif is_out_of_memory(e):
            line = f"out of memory while {_phase[0]}: {_phase[1]}"
        else:
            if os.environ.get("TINYMOE_TRACEBACK"):
                raise
            line = (f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                    f"(a bug: please report it; TINYMOE_TRACEBACK=1 shows where)")
        _say(f"error: {line}")
        status = 1
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _quiet_stdout()
    sys.exit(status)


# -----------------------------------------------------------------------------
# the one way to write a file


def write_file(path, write, mode="wb"):
    """Write path by calling write(f) on a temporary file in the same folder (named TMP_PREFIX...), flushed to
    disk and then renamed over path: an interruption or a full disk leaves the old file or nothing, never half
    of one. The temporary file is removed whatever happens; OSError passes on (run_main reports it)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)  # make the rename itself durable
            finally:
                os.close(fd)
        except OSError:
            pass  # some file systems cannot fsync a folder: the file itself is on disk
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a failed write (a full disk) as a RuntimeError raised while handling the OSError
        error = next((x for x in (e, e.__context__) if isinstance(x, OSError)), None)
        if error is not None and error.filename in (None, tmp):  # name the destination, not the temporary
            raise OSError(error.errno, error.strerror, path) from None
        raise
    return path


def write_text(path, text):
    return write_file(path, lambda f: f.write(text.encode()), "wb")


def remove_leftovers(folder):
    """Remove the temporary files that a killed write_file (of another process, since gone) left in folder."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX):
            pid = name[len(TMP_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def check_writable(folder):
    """OSError unless a file can be created in folder (made if missing): for long work that writes at the end."""
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-probe")
    with open(probe, "wb") as f:
        f.write(b"x")
    os.remove(probe)
