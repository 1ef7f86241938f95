"""Work done in a child process forked from this one: it sees this process's memory as it is (copied
only where either side writes) and shares no GIL with it.

Why: a compile writes BERT-base's pruned.onnx and masks.npz (~4 s: protobuf serialisation, onnx's
checker and zlib) while TVM builds the artifact, and the build is GIL-bound Python. On a thread the
writing still slowed the build by 1.8-2.4 s (7 s alone, 9 s beside it); in a child it runs on the
other core.

    >>> wait = start_forked(lambda: save_model(model, path))
    >>> ...                                   # this process goes on
    >>> wait()                                # raises what the child's work raised

The child runs only `work`: it must not use onnxruntime or TVM (their thread pools do not survive a
fork) and must not import (another thread may hold the import lock at the fork). Where the platform
cannot fork, or the fork fails (no memory for the copy), `work` runs when `wait()` is called instead.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable


def start_forked(work: Callable[[], None]) -> Callable[[], None]:
    """Start `work()` in a forked child; the returned `wait()` blocks until the child ends and raises the
    exception `work` raised there (pickled back through a pipe)."""
    if not hasattr(os, "fork"):
        return work
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return work
    if pid == 0:  # the child: run the work, report, and leave without running this process's exit handlers
        status = 0
        try:
            os.close(read_end)
            try:
                work()
                report = b""
            except BaseException as err:  # noqa: BLE001 - whatever it was, the parent raises it
                status = 1
                report = _pickled(err)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(report)
        finally:
            os._exit(status)
    os.close(write_end)

    def wait() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        _, status = os.waitpid(pid, 0)
        if report:
            raise pickle.loads(report)
        if status != 0:
            raise RuntimeError(f"the forked writer process ended with wait status {status}")

    return wait


def _pickled(err: BaseException) -> bytes:
    try:
        return pickle.dumps(err)
    except Exception:  # noqa: BLE001 - an exception that does not pickle still says what it was
        return pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))
