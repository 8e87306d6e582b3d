"""Running a model on the GPU while its weights stay in host memory, one layer at a time.

The big parts of every i2L model are long lists of identical layers (40 DINOv3 layers, 40
SigLIP2 layers, 240 decoder blocks, 28+32 Qwen2.5-VL layers). ``Streamer`` keeps the small parts
on the GPU for the duration of a call and copies each layer in just before it runs, on a
separate CUDA stream, while the previous layer computes; the layer's GPU copy is dropped right
after. Peak VRAM is a couple of layers plus activations; host-to-GPU copies from page-locked
memory run at PCIe speed and mostly hide behind compute.
"""
from __future__ import annotations

import torch

MIN_LAYERS = 4


def layer_lists(model: torch.nn.Module, min_share: float = 0.05) -> list[torch.nn.ModuleList]:
    """The ModuleLists of repeated layers that hold most of the weights (outermost ones only)."""
    total = sum(p.numel() for p in model.parameters()) or 1
    found: list[torch.nn.ModuleList] = []

    def visit(m):
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList) and len(child) >= MIN_LAYERS:
                share = sum(p.numel() for p in child.parameters()) / total
                if share >= min_share:
                    found.append(child)
                    continue
            visit(child)
    visit(model)
    return found


def _param_slots(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    slots = []
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p is not None:
                slots.append((mod, name))
    return slots


class Streamer:
    """``with Streamer(model, "cuda", wait=...): model(...)`` — see the module docstring.

    ``wait(tensor)`` is called before a host tensor is first copied, so weights that are still
    being read from disk are waited for, layer by layer, instead of all at once.
    """

    def __init__(self, model: torch.nn.Module, device, wait=None, dtype: torch.dtype | None = None,
                 layered: bool = True):
        self.model = model
        self.device = torch.device(device)
        self.wait = wait or (lambda t: None)
        self.dtype = dtype
        # layered=False: the whole model goes to the GPU for the call and leaves it after.
        self.layers: list[torch.nn.Module] = [l for lst in layer_lists(model) for l in lst] if layered else []
        streamed = {id(p) for l in self.layers for p in l.parameters()}
        self.resident = [(m, n) for (m, n) in _param_slots(model) if id(getattr(m, n)) not in streamed]
        self._slots = [_param_slots(l) for l in self.layers]
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        self._gpu: dict[int, list] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self._hooks = []
        self._buffers = []
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.bytes_copied = 0

    # -- moving parameters ----------------------------------------------------------------------
    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        self.wait(t)
        g = torch.empty(t.shape, dtype=self.dtype or t.dtype, device=self.device)
        g.copy_(t, non_blocking=True)
        self.bytes_copied += t.numel() * t.element_size()
        return g

    def _swap_in(self, slots, key_prefix) -> list:
        moved = []
        for mod, name in slots:
            p = getattr(mod, name)
            self._host[(id(mod), name)] = p.data
            p.data = self._to_device(p.data)
            moved.append(p.data)
        return moved

    def _swap_out(self, slots) -> None:
        for mod, name in slots:
            p = getattr(mod, name)
            p.data = self._host.pop((id(mod), name))

    def _fetch(self, i: int) -> None:
        if i >= len(self.layers) or i in self._gpu:
            return
        with torch.cuda.stream(self.copy_stream):
            self._gpu[i] = self._swap_in(self._slots[i], i)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self._events[i] = ev

    # -- hooks ------------------------------------------------------------------------------
    def _pre(self, i):
        def hook(module, args, kwargs=None):
            if i not in self._gpu and i not in self._events:
                self._fetch(i)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._events.pop(i))
            for g in self._gpu[i]:
                g.record_stream(compute)
            self._fetch(i + 1)           # the next layer's copy overlaps this layer's compute
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self._swap_out(self._slots[i])
            self._gpu.pop(i, None)
        return hook

    def layer(self, i: int):
        """For code that calls a layer's parts directly instead of ``layer(...)``: ``with s.layer(i): ...``."""
        streamer = self

        class _Use:
            def __enter__(self_inner):
                if streamer.device.type == "cuda":
                    streamer._pre(i)(streamer.layers[i], ())
                return streamer.layers[i]

            def __exit__(self_inner, *exc):
                if streamer.device.type == "cuda":
                    streamer._post(i)(streamer.layers[i], (), None)
        return _Use()

    def __enter__(self) -> "Streamer":
        if self.device.type != "cuda":
            for _, t in self._iter_host_tensors():
                self.wait(t)
            return self
        self._swap_in(self.resident, "resident")
        for mod in self.model.modules():
            for name, b in mod.named_buffers(recurse=False):
                if b is not None and b.device != self.device:
                    self._buffers.append((mod, name, b))
                    mod._buffers[name] = b.to(self.device, non_blocking=True)
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._pre(i)))
            self._hooks.append(layer.register_forward_hook(self._post(i)))
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type != "cuda":
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for i in list(self._gpu):
            self._swap_out(self._slots[i])
        self._gpu.clear()
        self._events.clear()
        self._swap_out(self.resident)
        for mod, name, b in self._buffers:
            mod._buffers[name] = b
        self._buffers.clear()

    def _iter_host_tensors(self):
        for mod, name in _param_slots(self.model):
            yield name, getattr(mod, name).data
