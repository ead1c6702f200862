"""Timing, FLOP counting and machine description shared by the scripts in bench/.

Device work is asynchronous, so every timed region ends with a synchronise; figures are medians
of repeats after warm-up calls. The bf16 roofline is the measured rate of a large bf16 matrix
product on the same device, not a datasheet figure.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from pathlib import Path

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, warmup: int = 1, device="cpu") -> tuple[list[float], object]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, and the
    last call's result."""
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result


def round_robin(paths: dict, repeats: int, warmup: int = 1, device="cpu"):
    """Seconds of each call of every path in ``paths`` (name -> fn), timed round-robin: after
    ``warmup`` untimed calls of each, every repeat runs every path once, so drift in a shared
    machine's speed moves all paths alike and their ratios hold. Returns (times, last results),
    both by name."""
    results = {name: timed(fn, 0, warmup, device)[1] for name, fn in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            took, results[name] = timed(fn, 1, 0, device)
            times[name] += took
    return times, results


def median(values) -> float:
    return float(statistics.median(values))


def matmul_tflops(
    device, m: int, k: int, n: int, dtype=torch.bfloat16, repeats: int = 20, warmup: int = 3
) -> float:
    """Measured TFLOP/s of an (m x k) @ (k x n) product on random data, the right operand stored
    as a linear layer's (n x k) weight."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    weight = torch.randn(n, k, device=device, dtype=dtype)
    times, _ = timed(lambda: torch.nn.functional.linear(a, weight), repeats, warmup, device)
    return 2 * m * k * n / median(times) / 1e12


def matmul_peak_tflops(device, size: int = 8192, dtype=torch.bfloat16, repeats: int = 20) -> float:
    """Measured TFLOP/s of a (size x size) @ (size x size) product: the practical roofline that
    model FLOP rates are quoted against."""
    return matmul_tflops(device, size, size, size, dtype, repeats)


def count_flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (matrix products, convolutions and
    attention, as torch's FLOP counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def describe_machine(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{name} ({memory:.0f} GiB), torch {torch.__version__}"
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def peak_memory_gb(device) -> float | None:
    """Peak GPU memory allocated by torch so far, in GB (None on a CPU)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def reset_peak_memory(device) -> bool:
    """Start new peaks of this process's resident memory and, on a GPU, of torch's allocation, so
    that later ``peak_rss_gb`` / ``peak_memory_gb`` count what is held and allocated from here on
    (weights already loaded included) and not the transient peaks of setup, such as building
    weights in fp32 before casting them. False where the resident peak cannot be reset (it can
    on Linux only)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GiB: since the last ``reset_peak_rss`` on Linux,
    since the start elsewhere."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pickalign_from_source() -> None:
    """Make ``pickalign.reward`` and the other rooms importable from this checkout without
    installing it (they live at the repository's root; an install maps them): the peers'
    environments, such as trl 0.23.1's, run the toy world's oracle from here."""
    import pickalign

    root = str(Path(__file__).resolve().parents[1])
    if root not in pickalign.__path__:
        pickalign.__path__.append(root)
