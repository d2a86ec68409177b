"""Per-rank wall time and peak memory of each phase of a run (log.resources), and the memory a rank
is expected to need: what `bench/scale.py` and `scripts/scale.sh` read.

With log.resources every rank prints one line per phase, `resources {json}`: the phase's seconds,
its peak resident memory, its resident memory as it started, the process's peak so far, and what the
phase adds (steps, users). A
phase's peak is its own: the kernel's high-water mark (VmHWM) is reset as the phase starts
(/proc/self/clear_refs, Linux >= 4.0), so a long run's later phases do not inherit the start-up's
peak. Where the reset is refused, a phase reports the process's peak so far (`"reset": false`).

`memory_bound` is what the rank holds by design: its table shards with their optimizer state, the
dense model with its gradients and Adam state, the head's buffers (the replicated per-item tables)
and the runtime (the interpreter, torch and TorchRec, measured before the dataset is opened).
Peak RSS beyond a small factor of it is memory that grows with the catalogue where it should not.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from missrec_torchrec.distributed import local_shards

PREFIX = "resources "
_state: Dict[str, Any] = {"on": False, "rank": 0, "peak": 0, "runtime": None}


def enable(on: bool, rank: int = 0) -> None:
    _state.update(on=bool(on), rank=int(rank))


def enabled() -> bool:
    return _state["on"]


def _status() -> Dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (zeros where /proc is missing)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def rss() -> int:
    return _status()["VmRSS"]


def _reset_peak() -> bool:
    _state["peak"] = max(_state["peak"], _status()["VmHWM"])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_seconds() -> float:
    """Seconds since this process started (its interpreter's start-up and imports included)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def report(phase: str, seconds: float, **extra: Any) -> None:
    """One `resources {json}` line for this rank (nothing unless enabled)."""
    if not _state["on"]:
        return
    status = _status()
    _state["peak"] = max(_state["peak"], status["VmHWM"])
    record = {"rank": _state["rank"], "phase": phase, "seconds": round(seconds, 3), "peak_bytes": status["VmHWM"],
              "process_peak_bytes": _state["peak"], "rss_bytes": status["VmRSS"], **extra}
    print(PREFIX + json.dumps(record), flush=True)


def release_memory() -> None:
    """Hand the allocators' free pages back to the system: glibc keeps the heap pages a phase freed
    (measured: ~300 MB after 60 training steps, in use ~260 MB), and the next phase's peak would sit
    on top of them. `malloc_trim` returns them (glibc only); pyarrow's pool releases its own."""
    libc = _state.get("libc")
    if libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim  # noqa: B018 - glibc's; other C libraries lack it
        except (OSError, AttributeError):
            libc = False
        _state["libc"] = libc
    if libc:
        libc.malloc_trim(0)
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()


@contextmanager
def phase(name: str, **extra: Any) -> Iterator[Dict[str, Any]]:
    """Time a phase and report its own peak; the caller may add fields to the yielded dict. The
    previous phases' freed memory is released first, logged or not (`release_memory`)."""
    release_memory()
    if not _state["on"]:
        yield {}
        return
    reset = _reset_peak()
    # What the phase starts from: a peak above it is the phase's own working set, below it what earlier
    # phases left in use.
    fields: Dict[str, Any] = {"start_bytes": rss(), **extra}
    t0 = time.perf_counter()
    yield fields
    report(name, time.perf_counter() - t0, reset=reset, **fields)


def mark_runtime() -> None:
    """Record the runtime's resident memory (call once the libraries are loaded, before any data)."""
    if _state["runtime"] is None:
        _state["runtime"] = rss()


def _tensor_bytes(t: Any) -> int:
    return sum(s.numel() * s.element_size() for s, _ in local_shards(t)) if t is not None else 0


def _state_bytes(state: Any) -> int:
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return _tensor_bytes(state) if isinstance(state, torch.Tensor) or hasattr(state, "local_shards") else 0


def memory_bound(dmp: nn.Module, head: nn.Module) -> Dict[str, int]:
    """This rank's bytes by design (see module doc); `total` sums them."""
    tables = sum(_tensor_bytes(v) for k, v in dmp.state_dict().items()
                 if ".embeddings." in k and k.endswith(".weight"))
    fused = _state_bytes(dmp.fused_optimizer.state_dict().get("state", {}))
    # A trainable parameter also holds its gradient and Adam's two moments.
    dense = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in head.parameters())
    buffers = sum(b.numel() * b.element_size() for b in head.buffers())
    out = {"tables": tables, "table_optimizer": fused, "dense": dense, "buffers": buffers,
           "runtime": int(_state["runtime"] or 0)}
    out["total"] = sum(out.values())
    return out


def report_bound(dmp: nn.Module, head: nn.Module, seconds: Optional[float] = None) -> None:
    """The start-up line: seconds since the process started and the rank's `memory_bound`."""
    if _state["on"]:
        report("startup", process_seconds() if seconds is None else seconds, bound=memory_bound(dmp, head))
