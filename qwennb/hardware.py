"""What the machine is: GPUs (through NVML and torch), host memory, and the notebook front end.

Nothing here raises on a machine without a GPU or without NVML: such facts are recorded in
``Hardware.notes`` instead, so that ``qwennb detect`` can say them in one line.

Memory is given in GiB (2**30 bytes), the unit in which drivers report a card's size: a "24 GB"
card shows about 24 GiB here.

Example:
    >>> from qwennb.hardware import detect
    >>> hw = detect()
    >>> hw.host_ram_gb > 0
    True
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

GIB = 1024**3

# Dense bf16 tensor-core FLOPs per clock per SM, by compute capability (major, minor). These are
# properties of the architecture, not of a card: the card's own SM count and clock come from the
# driver. GeForce/workstation parts of Ampere, Ada and Blackwell run bf16 with fp32 accumulation at
# half the data-centre rate, hence 512 against 1024/2048/4096.
_BF16_FLOPS_PER_CLOCK_PER_SM = {
    (8, 0): 2048,  # A100 / A30
    (8, 6): 512,  # RTX 30xx, A40, A10
    (8, 7): 512,  # Orin
    (8, 9): 512,  # RTX 40xx, L4, L40
    (9, 0): 4096,  # H100 / H200 / GH200
    (10, 0): 8192,  # B200
    (12, 0): 512,  # RTX 50xx
}
# What a card of each compute capability typically reaches (dense bf16 TFLOP/s, SMs x clock x the rate above):
# assumed for a described card whose SM count and clock are not given, and printed as such by the plan.
# 8.0 A100 SXM (108 SMs, 1410 MHz), 8.6 RTX 3090 (82, 1695), 8.9 RTX 4090 (128, 2520), 9.0 H100 SXM (132, 1980),
# 10.0 B200 (148, 1965), 12.0 RTX 5090 (170, 2407).
TYPICAL_BF16_TFLOPS = {"8.0": 312.0, "8.6": 71.0, "8.9": 165.0, "9.0": 1070.0, "10.0": 2384.0, "12.0": 209.0}
# Effective PCIe throughput per lane (GB/s, after encoding) by link generation.
_PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
# Share of the PCIe link that a pinned host-to-device copy reaches (54 GB/s measured on a
# Gen5 x16 H100 = 0.86 of 63 GB/s).
PCIE_EFFICIENCY = 0.86


@dataclass
class GPU:
    """One CUDA device as the driver and torch see it."""

    index: int
    name: str
    total_memory_gb: float
    free_memory_gb: float
    compute_capability: str
    bf16: bool
    sm_count: int | None = None
    max_sm_clock_mhz: int | None = None
    memory_bandwidth_gbps: float | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    uuid: str | None = None
    bf16_tflops: float | None = None  # a declared rate, used when SM count and clock are unknown

    @property
    def capability(self) -> tuple[int, int]:
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)

    @property
    def peak_bf16_tflops(self) -> float | None:
        """Nominal dense bf16 rate from SM count, clock and architecture; None when unknown."""
        per_sm = _BF16_FLOPS_PER_CLOCK_PER_SM.get(self.capability)
        if per_sm is None or not self.sm_count or not self.max_sm_clock_mhz:
            return self.bf16_tflops
        return self.sm_count * self.max_sm_clock_mhz * 1e6 * per_sm / 1e12

    @property
    def host_to_device_gbps(self) -> float | None:
        """Expected pinned host-to-device copy rate (GB/s) over this card's PCIe link."""
        if not self.pcie_gen or not self.pcie_width:
            return None
        lane = _PCIE_GBPS_PER_LANE.get(self.pcie_gen)
        return None if lane is None else lane * self.pcie_width * PCIE_EFFICIENCY

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_bf16_tflops"] = self.peak_bf16_tflops
        d["host_to_device_gbps"] = self.host_to_device_gbps
        return d


FLASH4_NOT_CHECKED = "not checked (a described machine)"


@dataclass
class Hardware:
    """The machine: GPUs, host memory, CPU count, MPS, notebook front end and free-text notes."""

    gpus: list[GPU]
    host_ram_gb: float
    host_ram_available_gb: float
    cpu_count: int
    mps: bool
    frontend: str
    driver_version: str | None = None
    cuda_version: str | None = None
    torch_version: str | None = None
    notes: list[str] = field(default_factory=list)
    # What this environment lacks for FlashAttention-4 (qwennb.attention.flash4_missing); None: nothing. A machine
    # described rather than detected was not checked (FLASH4_NOT_CHECKED).
    flash4_missing: str | None = FLASH4_NOT_CHECKED

    @property
    def best_gpu(self) -> GPU | None:
        """The GPU with the most memory (the one qwennb plans for), or None."""
        return max(self.gpus, key=lambda g: g.total_memory_gb, default=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [g.to_dict() for g in self.gpus]
        return d


def _round(x: float) -> float:
    return round(x, 2)


def _nvml_gpus(notes: list[str]) -> tuple[list[GPU], str | None]:
    try:
        import pynvml
    except ImportError:
        notes.append("nvidia-ml-py is not installed: GPUs are read from torch only.")
        return [], None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        notes.append(f"NVML is not available ({exc}): no NVIDIA driver on this machine.")
        return [], None
    gpus: list[GPU] = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)

            def _try(fn: Any, *args: Any) -> Any:
                try:
                    return fn(*args)
                except (pynvml.NVMLError, AttributeError):
                    return None

            bus = _try(pynvml.nvmlDeviceGetMemoryBusWidth, h)
            mem_clock = _try(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM)
            # DDR: two transfers a clock; NVML reports the HBM/GDDR clock so that this holds.
            bandwidth = bus * mem_clock * 1e6 * 2 / 8 / 1e9 if bus and mem_clock else None
            uuid = _try(pynvml.nvmlDeviceGetUUID, h)
            gpus.append(
                GPU(
                    index=i,
                    name=name,
                    total_memory_gb=_round(mem.total / GIB),
                    free_memory_gb=_round(mem.free / GIB),
                    compute_capability=f"{major}.{minor}",
                    bf16=major >= 8,
                    max_sm_clock_mhz=_try(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
                    memory_bandwidth_gbps=_round(bandwidth) if bandwidth else None,
                    pcie_gen=_try(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
                    pcie_width=_try(pynvml.nvmlDeviceGetMaxPcieLinkWidth, h),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                )
            )
    except pynvml.NVMLError as exc:
        notes.append(f"NVML stopped answering ({exc}).")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return gpus, driver


def visible_gpus(gpus: list[GPU], spec: str | None) -> list[GPU]:
    """The GPUs a CUDA program sees under ``CUDA_VISIBLE_DEVICES=spec``, in its order and renumbered as torch
    numbers them (NVML lists every GPU of the machine, whatever the variable says). Entries are NVML indices or
    UUIDs (a unique prefix is enough, as for CUDA); as in CUDA, the list ends at the first entry that names no
    GPU. ``None`` (unset) keeps all; MIG entries are not resolved here, so they keep all too.

    Example:
        >>> a = GPU(index=0, name="A", total_memory_gb=80, free_memory_gb=80, compute_capability="9.0", bf16=True)
        >>> b = GPU(index=1, name="B", total_memory_gb=24, free_memory_gb=24, compute_capability="8.9", bf16=True)
        >>> [(g.index, g.name) for g in visible_gpus([a, b], "1")]
        [(0, 'B')]
    """
    if spec is None or any(e.strip().startswith("MIG-") for e in spec.split(",")):
        return gpus
    chosen: list[GPU] = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.isdigit():
            match = [g for g in gpus if g.index == int(entry)]
        elif entry:
            match = [g for g in gpus if g.uuid and g.uuid.startswith(entry)]
        else:
            match = []
        if len(match) != 1 or match[0] in chosen:
            break
        chosen.append(match[0])
    return [replace(g, index=i) for i, g in enumerate(chosen)]


def _merge_torch(gpus: list[GPU], notes: list[str]) -> tuple[list[GPU], str | None]:
    """Fill in what only torch knows (SM count, bf16) and add devices NVML missed."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        notes.append("torch is not installed.")
        return gpus, None
    if not torch.cuda.is_available():
        if gpus:
            notes.append("NVML sees a GPU but torch cannot use CUDA (a CPU-only torch build?).")
        return gpus, None
    by_index = {g.index: g for g in gpus}
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        g = by_index.get(i)
        if g is None:
            free, total = torch.cuda.mem_get_info(i)
            g = GPU(
                index=i,
                name=props.name,
                total_memory_gb=_round(total / GIB),
                free_memory_gb=_round(free / GIB),
                compute_capability=f"{props.major}.{props.minor}",
                bf16=props.major >= 8,
            )
            gpus.append(g)
        g.sm_count = props.multi_processor_count
        g.bf16 = props.major >= 8
    return gpus, torch.version.cuda


def _read_meminfo() -> tuple[float, float]:
    total = avail = 0.0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024 / GIB
                elif key == "MemAvailable":
                    avail = int(rest.split()[0]) * 1024 / GIB
    except OSError:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
            avail = total
        except (ValueError, OSError, AttributeError):
            pass
    # A container (Binder, Colab, Kaggle) may be limited below the host's memory.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) / GIB < total:
            total = int(raw) / GIB
            avail = min(avail, total)
    return _round(total), _round(avail)


def detect_frontend(environ: dict[str, str] | None = None, modules: Any = None) -> str:
    """Name the notebook front end: colab, kaggle, binder, vscode, jupyter, ipython or plain.

    Example:
        >>> detect_frontend({"COLAB_RELEASE_TAG": "release-colab_20250101"}, {})
        'colab'
    """
    env = os.environ if environ is None else environ
    mods = sys.modules if modules is None else modules
    if "google.colab" in mods or "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in env or "KAGGLE_URL_BASE" in env:
        return "kaggle"
    if "BINDER_SERVICE_HOST" in env or "BINDER_LAUNCH_HOST" in env or "BINDER_REPO_URL" in env:
        return "binder"
    if "VSCODE_PID" in env or "VSCODE_CWD" in env or env.get("TERM_PROGRAM") == "vscode":
        return "vscode"
    if "ipykernel" in mods or "JPY_PARENT_PID" in env or "JPY_SESSION_NAME" in env:
        return "jupyter"
    ipython = mods.get("IPython")  # asked only when something else imported it: the core imports no IPython
    if ipython is not None:
        try:
            if ipython.get_ipython() is not None:
                return "ipython"
        except Exception:  # pragma: no cover - defensive, IPython half-imported
            pass
    return "plain"


def detect() -> Hardware:
    """Look at the machine: every GPU, host RAM, CPUs, MPS and the notebook front end.

    Example:
        >>> hw = detect()
        >>> [g.name for g in hw.gpus]  # doctest: +SKIP
        ['NVIDIA H100 80GB HBM3']
    """
    notes: list[str] = []
    gpus, driver = _nvml_gpus(notes)
    hidden = len(gpus)
    gpus = visible_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if len(gpus) < hidden:
        notes.append(
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}: {len(gpus)} of the machine's {hidden} "
            "GPUs are visible; the plan uses only those."
        )
    torch_version = mps = cuda = None
    gpu_device_files = any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))
    if gpus or gpu_device_files or sys.platform != "linux" or os.environ.get("QWENNB_DETECT_TORCH") == "1":
        gpus, cuda = _merge_torch(gpus, notes)
        try:
            import torch

            torch_version = torch.__version__
            mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        except ImportError:  # pragma: no cover
            pass
    else:
        # Linux without a GPU driver's device files: torch can see no GPU either, so it is not imported (seconds
        # saved on every `qwennb detect` and `qwennb plan` of a CPU machine).
        from importlib import metadata

        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    if not gpus:
        notes.append("No CUDA GPU found: qwennb will run the embedded toy model on the CPU.")
    for g in gpus:
        if not g.bf16:
            notes.append(
                f"GPU {g.index} ({g.name}, compute {g.compute_capability}) has no bf16: "
                "Qwen-Image gives NaN (black) images in fp16."
            )
    flash4 = "no CUDA GPU"
    if gpus:
        from .attention import flash4_missing

        flash4 = flash4_missing()
    total, avail = _read_meminfo()
    return Hardware(
        gpus=gpus,
        host_ram_gb=total,
        host_ram_available_gb=avail,
        cpu_count=os.cpu_count() or 1,
        mps=bool(mps),
        frontend=detect_frontend(),
        driver_version=driver,
        cuda_version=cuda,
        torch_version=torch_version,
        notes=notes,
        flash4_missing=flash4,
    )
