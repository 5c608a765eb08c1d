"""Memory of one GPU-config meta-training task, measured without a GPU, per support image.

Will a ``jobs/configs/gpu.yaml`` task fit a 24 GB GPU? The activations an unrolled
second-order meta-gradient keeps alive (every inner step's forward and its differentiable
backward, until the outer backward) do not depend on the device, so they are counted here:
each support size runs one ``meta_gradient`` of one task (the trainer's code path) in a fresh
child process, and two figures are taken:

* ``saved_gb``: the peak of the bytes autograd holds for backward (every tensor packed by
  ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, released when its
  graph node is freed), i.e. the activation memory a GPU would have to hold;
* ``rss_gb`` (``--device cpu`` only): the child's peak resident memory minus its resident
  memory just before the task (allocator slack, temporaries and the above).

``--device cpu`` computes for real; ``--device meta`` (the default) runs the same graph on
PyTorch's meta device, where tensors have shapes and dtypes but no data: the saved-tensor count
is the same to the byte (checked against ``--device cpu`` at small sizes) and a 224 px task
takes seconds instead of CPU-hours. (On meta the final ``float(loss)`` cannot be read; the
graph work is done by then.)

A least-squares line through the support sizes gives GB per support image; the row for 80
(the paper's support size) is extrapolated from it, as is the largest support size that fits a
24 GB GPU after ``--reserve-gb`` for the CUDA context, cuDNN workspace, weights, optimizer
state and fragmentation.

Usage::

    python benchmarks/gpu_memory.py                      # 224 px, supports 10 20 40, float32
    python benchmarks/gpu_memory.py --amp                # the same under bf16 autocast (CPU)
    python benchmarks/gpu_memory.py --supports 4 8 --image-size 112   # a quick look

Writes ``benchmarks/results/gpu_memory[_bf16].json`` and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import in_child, linear_fit, machine, save, table  # noqa: E402

GPU_MEMORY_GB = 24.0  # an A10G (g5) or an L4
SLACK = 1.2  # allocator fragmentation and backward transients over the saved-tensor count


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure(config: str, support: int, image_size: int, amp: bool, threads: int,
            device: str = "meta") -> dict:
    """One task's meta-gradient at ``support`` images; memory figures in bytes."""
    import torch

    sys.path.insert(0, str(ROOT))
    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.meta import meta_gradient, meta_kwargs
    from piaa_dist.model import autocast, build_model

    torch.set_num_threads(threads)
    cfg = with_overrides(load_config(config), {"model.pretrained": "none"})
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    gen = torch.Generator().manual_seed(1)

    def rand(*shape, normal=True):
        x = torch.randn(*shape, generator=gen) if normal else torch.rand(*shape, generator=gen)
        return x.to(device) if device == "cpu" else torch.empty(*shape, device=device)

    from types import SimpleNamespace

    task = SimpleNamespace(
        user="u",
        support=(rand(support, 3, image_size, image_size), rand(support, normal=False)),
        query=(rand(cfg.data.query_size, 3, image_size, image_size),
               rand(cfg.data.query_size, normal=False)),
    )

    live: dict[int, int] = {}
    state = {"now": 0, "peak": 0}

    def pack(t: torch.Tensor):
        # Count each storage once while any graph node holds it.
        try:
            storage = t.untyped_storage()
            # _cdata identifies the storage itself (meta storages all have data_ptr 0)
            key, size = storage._cdata, storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if key not in live:
            state["now"] += size
            state["peak"] = max(state["peak"], state["now"])
            live[key] = 0
        live[key] += 1
        return _Held(t, key, size, live, state)

    def unpack(h):
        return h.t if isinstance(h, _Held) else h

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    kwargs = meta_kwargs(model, cfg.meta)
    _reset_peak_rss()
    before = _rss_bytes()
    t0 = time.perf_counter()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), \
                autocast("cpu", amp and device == "cpu", emulate_on_cpu=True):
            meta_gradient(model, params, buffers, [task], flavour=cfg.meta.flavour, **kwargs)
    except RuntimeError as err:
        if device != "meta" or "meta tensors" not in str(err):
            raise  # on meta only the final float(loss) may fail, after all the graph work
    seconds = time.perf_counter() - t0
    return {
        "support": support,
        "saved_bytes": state["peak"],
        "rss_bytes": _peak_rss_bytes() - before if device == "cpu" else float("nan"),
        "seconds": seconds,
    }


class _Held:
    """A saved tensor and its bookkeeping: the storage leaves the count when the last holder goes."""

    __slots__ = ("key", "live", "size", "state", "t")

    def __init__(self, t, key, size, live, state):
        self.t, self.key, self.size, self.live, self.state = t, key, size, live, state

    def __del__(self):
        self.live[self.key] -= 1
        if self.live[self.key] == 0:
            del self.live[self.key]
            self.state["now"] -= self.size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "jobs/configs/gpu.yaml"))
    p.add_argument("--supports", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (emulated on CPU; --device cpu only)")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="meta: count without computing (seconds); cpu: compute for real (hours at 224 px)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extrapolate", type=int, default=80)
    p.add_argument("--reserve-gb", type=float, default=1.5,
                   help="GPU memory set aside for context, workspace, weights, optimizer, fragmentation")
    args = p.parse_args()

    rows = []
    for s in args.supports:
        r = in_child(measure, config=args.config, support=s, image_size=args.image_size,
                     amp=args.amp, threads=args.threads, device=args.device)
        r["saved_gb"] = r.pop("saved_bytes") / 1e9
        r["rss_gb"] = r.pop("rss_bytes") / 1e9
        r["kind"] = "measured"
        rows.append(r)
        print(f"support {s}: saved {r['saved_gb']:.2f} GB, rss {r['rss_gb']:.2f} GB, {r['seconds']:.0f} s",
              flush=True)
    xs = [float(r["support"]) for r in rows]
    keys = ("saved_gb", "rss_gb") if args.device == "cpu" else ("saved_gb",)
    fits = {k: linear_fit(xs, [r[k] for r in rows]) for k in keys}
    budget = GPU_MEMORY_GB - args.reserve_gb
    extra = {"support": args.extrapolate, "kind": "extrapolated", "seconds": float("nan"),
             "rss_gb": float("nan"),
             **{k: slope * args.extrapolate + icpt for k, (slope, icpt) in fits.items()}}
    rows.append(extra)
    print(table(rows, [("support", "support", "d"), ("kind", "", "s"), ("saved_gb", "saved GB", ".2f"),
                       ("rss_gb", "RSS GB", ".2f"), ("seconds", "s", ".0f")]))
    slope, icpt = fits["saved_gb"]
    # Allocator slack and transients on top of what autograd holds: a 1.2 factor.
    fit_max = int((budget / SLACK - icpt) / slope) if slope > 0 else None
    print(f"per support image: {slope:.4f} GB saved for backward (+{icpt:.2f} GB for the query set "
          f"and weights); largest support whose {SLACK:g} x saved fits {GPU_MEMORY_GB:.0f} GB - "
          f"{args.reserve_gb:g} GB reserve: {fit_max}")
    name = "gpu_memory" + ("_bf16" if args.amp else "") + ("_cpu" if args.device == "cpu" else "")
    path = save(name, {
        "machine": machine(), "config": args.config, "image_size": args.image_size, "amp": args.amp,
        "rows": rows,
        "per_image_gb": {k: v[0] for k, v in fits.items()},
        "intercept_gb": {k: v[1] for k, v in fits.items()},
        "device": args.device, "slack": SLACK,
        "gpu_memory_gb": GPU_MEMORY_GB, "reserve_gb": args.reserve_gb, "largest_support_that_fits": fit_max,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
