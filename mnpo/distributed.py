"""Tear down torch.distributed before the interpreter exits, so a finished distributed stage exits 0.

A process group that is still alive when Python finalises keeps its backend's C++ threads running
(gloo: `pt_gloo_runloop`, `gloo_tcp_loop`). When such a thread drops the last reference to a tensor of
its last collective after finalisation has begun, it needs the GIL, is unwound by the exiting
interpreter inside a noexcept destructor, and the process aborts with `terminate called without an
active exception` (SIGABRT) although its work is done: rarely on an idle machine, often on a loaded one.

`destroy_process_group()` alone did not end those threads, because the group object outlived it:
- modules imported lazily after the group exists (transformers imports `torch.distributed.fsdp` on
  first use, which imports `torch.distributed.nn.functional`; DeepSpeed's `deepspeed.comm.torch`)
  bind the live default group as a default argument (`group=group.WORLD` is evaluated at import);
- DeepSpeed ZeRO-3 keeps every model it wrapped in `parameter_offload.FWD_MODULE_STACK` (it never pops
  the top module), and each sharded parameter holds its group;
- a trainer or engine in a reference cycle holds its groups until the next garbage collection.
`shutdown()` destroys the groups, drops those references and collects the cycles. Not solved: DeepSpeed
engines (ZeRO-1/2 optimisers, ZeRO-3 models) keep their groups alive through cycles that the collector
cannot break; a warning at exit says so. Upstream: pytorch/pytorch PR 179291 (an atexit destroy,
abandoned); the workarounds can go when torch and DeepSpeed stop evaluating `group.WORLD` at import
and DeepSpeed pops its top module.

No barrier here: `destroy_process_group` is local (no collective), every entry point ends with a
collective on all ranks (so no rank still talks to another when it returns), and a barrier on a
failure path would hang a rank that failed alone until the backend's timeout.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import types
import weakref

logger = logging.getLogger(__name__)

_destroyed: list[weakref.ref] = []  # the groups shutdown() destroyed, checked once more at exit


def process_rank() -> int:
    """This process's global rank: torch.distributed's when a group exists, else the launcher's RANK
    (torchrun and accelerate set it before the process starts, so logging can be configured before any
    group exists), else 0. Imports nothing: torch.distributed is asked only if something imported it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """True on global rank 0: the one process of a multi-process run that logs progress and INFO lines."""
    return process_rank() == 0


def shutdown() -> None:
    """Destroy every process group of this process so their backend threads end before the interpreter
    does. A no-op when torch.distributed is not initialised (or not even imported: then it costs nothing).
    Called by `mnpo.cli.main` after every command and by the entry points run under a launcher."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed import distributed_c10d as c10d

    if not _destroyed:
        atexit.register(_check_at_exit)
    _destroyed.extend(weakref.ref(pg) for pg in list(c10d._world.pg_map))
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()  # also drops DeepSpeed's own references to its groups
    else:
        dist.destroy_process_group()  # every group, the default one included
    _release_captured_groups(dist.ProcessGroup)
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if isinstance(getattr(offload, "FWD_MODULE_STACK", None), list):
        offload.FWD_MODULE_STACK.clear()  # no forward runs any more; it only keeps ZeRO-3 models alive
    gc.collect()


def _release_captured_groups(group_type: type) -> None:
    """Replace process groups bound as default arguments in torch.distributed's and DeepSpeed's modules
    (functions and methods, e.g. torch.distributed.nn.functional.all_reduce, TorchBackend.barrier) by
    None: what those defaults are when the module is imported before any group exists."""
    for name, module in list(sys.modules.items()):
        if not name.startswith(("torch.distributed", "deepspeed")) or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == name:
                functions = [v for v in vars(value).values() if isinstance(v, types.FunctionType)]
            elif isinstance(value, types.FunctionType):
                functions = [value]
            else:
                continue
            for fn in functions:
                if fn.__defaults__ and any(isinstance(d, group_type) for d in fn.__defaults__):
                    fn.__defaults__ = tuple(None if isinstance(d, group_type) else d for d in fn.__defaults__)
                for key, d in (fn.__kwdefaults__ or {}).items():
                    if isinstance(d, group_type):
                        fn.__kwdefaults__[key] = None


def _check_at_exit() -> None:
    """Last chance while the interpreter is whole: free groups held by garbage cycles, name a leak."""
    if any(ref() is not None for ref in _destroyed):
        gc.collect()
    alive = sum(ref() is not None for ref in _destroyed)
    if alive:
        logger.warning(
            "%d destroyed process group(s) are still referenced at exit; their threads may abort the process "
            "(terminate called without an active exception)",
            alive,
        )
