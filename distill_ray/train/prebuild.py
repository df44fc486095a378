"""Build DeepSpeed's CPU shared-memory comm op once, ahead of any training run.

DeepSpeed JIT-compiles this op the first time a process initialises its comm backend
(~70 s on two cores). Doing it at install time (`python -m distill_ray.train.prebuild`)
keeps that cost out of every test and every first training run. The build lands in
TORCH_EXTENSIONS_DIR, which we point inside the virtualenv (unless the user already
set it) so it survives across runs and is shared by Ray workers started from the same
environment. Re-running is fast: torch's loader only checks the sources' hashes.
"""
from __future__ import annotations

import os
import sys
import time


def extensions_dir() -> str:
    """The persistent build dir every process of this environment agrees on."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")


def ensure_extensions_dir() -> str:
    """The build dir set in TORCH_EXTENSIONS_DIR, and this environment's tools first on PATH."""
    # Must run before DeepSpeed's comm backend is created: that is when it loads the op.
    path = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    os.makedirs(path, exist_ok=True)
    _environment_tools_first()
    return path


def _environment_tools_first() -> None:
    """This environment's bin dir first on PATH, as activating it would do.

    torch builds with whichever `ninja` PATH finds first, and two ninja versions keep
    build logs the other discards: each then rebuilt the op from scratch. Install and
    tests found the system's ninja, nodes started by cluster/local_cluster.sh the
    environment's own (DeepSpeed depends on the `ninja` package), so a clean `make test`
    built the op three times.
    """
    bindir = os.path.dirname(sys.executable)
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if not parts or parts[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, *(p for p in parts if p != bindir)])


def prebuild(verbose: bool = False) -> str:
    """Build (or just load) the shm comm op; returns the extensions dir. Idempotent."""
    path = ensure_extensions_dir()
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        # Not on Linux/CPU: DeepSpeed falls back to plain torch.distributed, nothing to build.
        return path
    builder.load(verbose=verbose)
    return path


def main() -> None:
    start = time.time()
    path = prebuild(verbose="-v" in sys.argv[1:])
    print(f"DeepSpeed CPU comm op ready in {path} ({time.time() - start:.1f}s)")


if __name__ == "__main__":
    main()
