"""Running a model on the GPU while its weights stay in host memory, one layer at a time.

The big parts of every i2L model are long lists of identical layers (40 DINOv3 layers, 40
SigLIP2 layers, 240 decoder blocks, 28+32 Qwen2.5-VL layers). ``Streamer`` keeps the small parts
on the GPU for the duration of a call and copies each layer in just before it runs, on a
separate CUDA stream, while the previous layer computes. Layers land in a small ring of fixed
GPU buffers that are reused over and over, so VRAM stays at a few layers plus activations and the
allocator's cache does not grow. Host-to-GPU copies from page-locked memory run at PCIe speed and
mostly hide behind compute.

``GpuMirror`` keeps the GPU copies of layers from one job to the next, up to a budget, so jobs
made in a burst skip most of the copying; the engine drops it when the burst is over.
"""
from __future__ import annotations

import torch

MIN_LAYERS = 4
RING = 3            # layer buffers: one computing, one or two being filled
ALIGN = 256


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


HOST_ONLY = "_i2l_host_only"


def keep_on_host(module: torch.nn.Module) -> None:
    """Leave a module's parameters in host memory whenever its model is streamed (the caller
    computes with them there). Set when the model is built, before it is first streamed."""
    module.__dict__[HOST_ONLY] = True


def is_on_host(module: torch.nn.Module) -> bool:
    return bool(module.__dict__.get(HOST_ONLY))


def _host_only(model: torch.nn.Module) -> set:
    return {id(p) for m in model.modules() if is_on_host(m) for p in m.parameters()}


def _param_slots(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    slots = []
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p is not None:
                slots.append((mod, name))
    return slots


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _span_of(slots):
    """(host bytes, base pointer) when the parameters in ``slots`` (a layer's) lie together in one
    host buffer (they do in a safetensors file: a layer's tensors are stored side by side), so the
    layer moves with one copy; None otherwise."""
    hosts = [getattr(m, n).data for m, n in slots]
    if not hosts:
        return None
    storage = hosts[0].untyped_storage()
    if any(h.untyped_storage().data_ptr() != storage.data_ptr() or not h.is_contiguous() for h in hosts):
        return None
    base = min(h.data_ptr() for h in hosts)
    end = max(h.data_ptr() + _nbytes(h) for h in hosts)
    if end - base > 1.25 * sum(_nbytes(h) for h in hosts) + 4096:
        return None
    if any((h.data_ptr() - base) % h.element_size() for h in hosts):
        return None
    src = torch.empty(0, dtype=torch.uint8).set_(storage, base - storage.data_ptr(), (end - base,))
    return src, base


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for every streamer's copies (made once: streams are not freed)."""
    device = torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    st = _COPY_STREAMS.get(key)
    if st is None:
        st = _COPY_STREAMS[key] = torch.cuda.Stream(device)
    return st


_COPY_STREAMS: dict[int, torch.cuda.Stream] = {}


class _Layout:
    """What streaming a model needs that depends on its structure alone, worked out once per model
    (walking the thousands of modules of a decoder takes a tenth of a second): the layers, each
    layer's parameter slots, the slots outside the layers, the buffers; and each layer's host span,
    found again while its parameters stay where they were."""

    ATTR = "_i2l_stream_layout"

    @classmethod
    def of(cls, model: torch.nn.Module, layered: bool) -> "_Layout":
        cache = model.__dict__.setdefault(cls.ATTR, {})
        layout = cache.get(layered)
        if layout is None:
            layout = cache[layered] = cls(model, layered)
        return layout

    def __init__(self, model: torch.nn.Module, layered: bool):
        lists = layer_lists(model) if layered else []
        self.layers: list[torch.nn.Module] = [l for lst in lists for l in lst]
        starts = [sum(len(x) for x in lists[:k]) for k in range(len(lists))]
        self.lists = [slice(a, a + len(x)) for a, x in zip(starts, lists)]    # each list's layers
        streamed = {id(p) for l in self.layers for p in l.parameters()}
        host = _host_only(model)
        self.host_only = [(m, n) for (m, n) in _param_slots(model) if id(getattr(m, n)) in host]
        self.resident = [(m, n) for (m, n) in _param_slots(model)
                         if id(getattr(m, n)) not in streamed and id(getattr(m, n)) not in host]
        self.slots = [_param_slots(l) for l in self.layers]
        self.buffer_slots = [(mod, name) for mod in model.modules()
                             for name, b in mod.named_buffers(recurse=False) if b is not None]
        self._spans: list = [None] * len(self.layers)
        self._marks: list = [None] * len(self.layers)
        self.hosts: list = [None] * len(self.layers)     # per layer: [(parameter, its host tensor)]

    def _mark(self, i: int):
        """Which parameters layer ``i`` has and where its first and last lie now (what was found
        before is still right while they have not moved: a layer's parameters are replaced all
        together or not at all)."""
        slots = self.slots[i]
        if not slots:
            return None
        (m0, n0), (m1, n1) = slots[0], slots[-1]
        p0, p1 = getattr(m0, n0), getattr(m1, n1)
        return id(p0), p0.data_ptr(), id(p1), p1.data_ptr(), len(slots)

    def slot_bytes(self, spans: list) -> int:
        """The size of one ring buffer: the largest layer, each tensor aligned where a layer's
        tensors do not lie together."""
        return max(_aligned(span[0].numel()) if span is not None else
                   sum(_aligned(_nbytes(getattr(m, n))) for m, n in slots)
                   for span, slots in zip(spans, self.slots))

    def spans(self) -> list:
        """Each layer's (host bytes, base address), or None where its tensors do not lie together;
        the layers' parameters and host tensors are in ``hosts`` afterwards."""
        out = []
        for i in range(len(self.layers)):
            mark = self._mark(i)
            if mark is None or mark != self._marks[i]:
                self._spans[i] = _span_of(self.slots[i])
                params = [getattr(m, n) for m, n in self.slots[i]]
                self.hosts[i] = [(p, p.data) for p in params]
                self._marks[i] = mark
            out.append(self._spans[i])
        return out


def ring_bytes(model: torch.nn.Module) -> int:
    """The GPU bytes of a streamed model's ring of layer buffers (0 when it has no layers)."""
    layout = _Layout.of(model, True)
    return layout.slot_bytes(layout.spans()) * min(RING, len(layout.layers)) if layout.layers else 0


def plan_holds(models: list, budget: int) -> set:
    """Which host spans a mirror of ``budget`` bytes keeps for a job that runs ``models``
    (``(model, layered, passes)``: passes, how many times the job runs the model's layers), as
    keys for ``GpuMirror.plan``.

    A streamed layer's copy overlaps the computing only from two layers ahead, so what is kept
    decides when the copying can run: the small parts outside the layers are kept first; then
    the layers whose copies cost a job most, by their size times the model's passes (a DINOv3
    layer is 335 MB and computes in about a millisecond for one image: its copy is the hardest to
    hide; Qwen2.5-VL's 466 MB layers run twice or more), while the small ones (SigLIP2's 58 MB, a
    decoder block's 20 MB) are copied while the processor issues the work of the layers around
    them. Where only part of a model's layers fit, those that go through the ring are spread
    evenly among them, so the copying runs all along the model instead of waiting for its end."""
    keys: set = set()
    used = 0

    def take(ptr: int, n: int) -> bool:
        nonlocal used
        if used + _aligned(n) > budget:
            return False
        keys.add((ptr, n))
        used += _aligned(n)
        return True
    groups = []
    for model, layered, passes in models:
        layout = _Layout.of(model, layered)
        for m, name in layout.resident:
            h = getattr(m, name).data
            if h.device.type == "cpu" and h.is_contiguous() and _nbytes(h):
                take(h.data_ptr(), _nbytes(h))
        every = layout.spans()
        for lst in layout.lists:
            spans = [sp for sp in every[lst] if sp is not None]
            if spans:
                groups.append((passes * sum(sp[0].numel() for sp in spans) / len(spans), spans))
    for _, spans in sorted(groups, key=lambda g: -g[0]):
        size = max(_aligned(sp[0].numel()) for sp in spans)
        fit = min(len(spans), max(0, budget - used) // size)
        rest = len(spans) - fit
        through_ring = {int((j + 0.5) * len(spans) / rest) for j in range(rest)} if rest else set()
        for i, (src, base) in enumerate(spans):
            if i not in through_ring:
                take(base, src.numel())
    return keys


class GpuMirror:
    """GPU copies of host weights kept between calls, up to ``limit`` bytes.

    A copy is found again by the host bytes it mirrors (address and length), so it must be
    dropped whenever those host bytes are freed or change; the engine does that.
    """

    def __init__(self, device, limit: int = 0):
        self.device = torch.device(device)
        self.limit = limit
        self.nbytes = 0
        self._copies: dict[tuple[int, int], torch.Tensor] = {}
        self.views: dict[tuple[int, int], list] = {}     # a layer's parameter views of a kept copy
        self._plan: set | None = None                    # the host spans it may keep; None: any

    def plan(self, keys: set | None) -> None:
        """Keep only these host spans from now on (``plan_holds``); copies outside them are freed."""
        self._plan = keys
        if keys is not None:
            for key in [k for k in self._copies if k not in keys]:
                self.discard(*key)

    def find(self, ptr: int, n: int) -> torch.Tensor | None:
        """The kept copy of host ``[ptr, ptr + n)``, if there is one."""
        return self._copies.get((ptr, n))

    def get(self, ptr: int, n: int) -> tuple[torch.Tensor | None, bool]:
        """(GPU bytes for host ``[ptr, ptr + n)``, True if they still have to be filled), or
        (None, False) when the budget has no room for them."""
        buf = self._copies.get((ptr, n))
        if buf is not None:
            return buf, False
        if self.nbytes + _aligned(n) > self.limit or (self._plan is not None and (ptr, n) not in self._plan):
            return None, False
        buf = torch.empty(_aligned(n), dtype=torch.uint8, device=self.device)
        self._copies[(ptr, n)] = buf
        self.nbytes += _aligned(n)
        return buf, True

    def clear(self) -> None:
        """Free every kept copy now (whoever still holds this object)."""
        self._copies.clear()
        self.views.clear()
        self.nbytes = 0

    def discard(self, ptr: int, n: int) -> None:
        """Forget a copy (one whose copy failed, or one a new plan leaves out)."""
        buf = self._copies.pop((ptr, n), None)
        self.views.pop((ptr, n), None)
        if buf is not None:
            self.nbytes -= buf.numel()

    def __len__(self) -> int:
        return len(self._copies)


class Streamer:
    """``with Streamer(model, "cuda", wait=...): model(...)`` — see the module docstring.

    ``wait(tensor)`` is called before a host tensor is copied, so weights still being read from
    disk are waited for layer by layer instead of all at once. ``layered=False`` moves the whole
    model to the GPU for the call instead (fastest, most VRAM) and takes it off afterwards.
    With a ``mirror``, layers go to (or are found in) its kept copies while its budget lasts, and
    through the ring after that. ``point=False``: the layers' parameters are left alone and the
    caller reads each layer's GPU bytes with ``span(i)`` (fewer tensor operations per layer);
    it falls back to pointing when a layer's tensors do not lie together.
    """

    def __init__(self, model: torch.nn.Module, device, wait=None, layered: bool = True,
                 mirror: GpuMirror | None = None, point: bool = True):
        self.model = model
        self.point = point
        self.mirror = mirror if torch.device(device).type == "cuda" else None
        self.device = torch.device(device)
        self.wait = wait or (lambda t: None)
        self._layout = _Layout.of(model, layered)
        self.layers = self._layout.layers
        self.resident = self._layout.resident
        self._slots = self._layout.slots
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        self._resident_gpu: list[torch.Tensor] = []
        self._ring: list[torch.Tensor] = []
        self._ring_size = 0
        self._span_bufs: dict[int, tuple[torch.Tensor, int]] = {}
        self._spans: list = []
        self._in_slot: dict[int, int] = {}           # layer -> ring slot holding it
        self._ready: dict[int, torch.cuda.Event] = {}
        self._free: dict[int, torch.cuda.Event] = {}   # slot -> event: compute done with it
        self._hooks = []
        self._buffers = []
        self.copy_stream = _copy_stream(self.device) if self.device.type == "cuda" else None
        self._compute = None            # the stream the model runs on, from entering
        self.bytes_copied = 0

    # -- copies -------------------------------------------------------------------------------
    def span(self, i: int) -> tuple[torch.Tensor, int]:
        """(GPU bytes of layer ``i``, the host address they mirror) inside ``layer(i)`` when not pointing."""
        return self._span_bufs[i]

    def _point(self, i: int, buf: torch.Tensor, base: int, mirrored: bool = False) -> None:
        """Make layer ``i``'s parameters views of ``buf``, which holds its host span from ``base``
        (the views of a copy the mirror keeps are made once and kept with it)."""
        if not self.point:
            self._span_bufs[i] = (buf, base)
            return
        hosts = self._layout.hosts[i]
        key = (base, self._spans[i][0].numel()) if mirrored else None
        views = self.mirror.views.get(key) if mirrored else None
        if views is None:
            views = [buf[h.data_ptr() - base:h.data_ptr() - base + _nbytes(h)].view(h.dtype).view(h.shape)
                     for _, h in hosts]
            if mirrored:
                self.mirror.views[key] = views
        for (p, _), v in zip(hosts, views):
            p.data = v

    def _mirrored(self, src: torch.Tensor, ptr: int) -> tuple[torch.Tensor | None, torch.cuda.Event | None]:
        """The mirror's copy of host ``src`` (whose bytes start at ``ptr``), filled on the copy
        stream if new there: (GPU bytes, event to wait for or None), or (None, None) if no room."""
        n = _nbytes(src)
        buf = self.mirror.find(ptr, n)
        if buf is not None:
            return buf, None
        with torch.cuda.stream(self.copy_stream):
            buf, fresh = self.mirror.get(ptr, n)
            if buf is None or not fresh:
                return buf, None
            try:
                self.wait(src)
                buf[:n].view(src.dtype).view(src.shape).copy_(src, non_blocking=True)
            except BaseException:
                self.mirror.discard(ptr, n)
                raise
            self.bytes_copied += n
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        return buf, ev

    def _fetch_mirrored(self, i: int) -> bool:
        """Layer ``i`` from the mirror (copied into it first if new there); False if it has no room."""
        span = self._spans[i]
        if self.mirror is None or span is None:
            return False
        src, base = span
        buf, ev = self._mirrored(src, base)
        if buf is None:
            return False
        self._point(i, buf, base, mirrored=True)
        self._ready[i] = ev
        self._in_slot[i] = None
        return True

    def _ring_buffers(self) -> list[torch.Tensor]:
        if not self._ring and self._ring_size:
            self._ring = [torch.empty(self._ring_size, dtype=torch.uint8, device=self.device)
                          for _ in range(min(RING, len(self.layers)))]
            self.copy_stream.wait_stream(self._compute)
        return self._ring

    def _fetch(self, i: int) -> None:
        """Copy layer ``i`` into its ring slot on the copy stream (no-op if there already)."""
        if i >= len(self.layers) or i in self._in_slot:
            return
        if self._fetch_mirrored(i):
            return
        ring = self._ring_buffers()
        slot = i % len(ring)
        buf = ring[slot]
        with torch.cuda.stream(self.copy_stream):
            if slot in self._free:                       # the layer that used the slot is done
                self.copy_stream.wait_event(self._free.pop(slot))
            span = self._spans[i]
            if span is not None:
                src, base = span
                self.wait(src)
                buf[:src.numel()].copy_(src, non_blocking=True)
                self.bytes_copied += src.numel()
                self._point(i, buf, base)
            off = 0
            for mod, name in (self._slots[i] if span is None else ()):
                p = getattr(mod, name)
                host = p.data
                self.wait(host)
                n = _nbytes(host)
                view = buf[off:off + n].view(host.dtype).view(host.shape)
                view.copy_(host, non_blocking=True)
                self._host[(id(mod), name)] = host
                p.data = view
                off += _aligned(n)
                self.bytes_copied += n
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self._ready[i] = ev
        self._in_slot[i] = slot

    def _restore(self, i: int) -> None:
        if self.point and self._spans[i] is not None:
            for p, host in self._layout.hosts[i]:
                p.data = host
        elif self.point:
            for mod, name in self._slots[i]:
                getattr(mod, name).data = self._host.pop((id(mod), name))
        else:
            self._span_bufs.pop(i, None)
        slot = self._in_slot.pop(i)
        if slot is None:                 # a mirrored layer: its copy stays where it is
            return
        ev = torch.cuda.Event()
        ev.record(self._compute)
        self._free[slot] = ev

    # -- hooks --------------------------------------------------------------------------------
    def _pre(self, i):
        def hook(module, args, kwargs=None):
            self._fetch(i)
            ready = self._ready.pop(i)
            if ready is not None:
                self._compute.wait_event(ready)
            for j in range(i + 1, min(i + RING, len(self.layers))):
                self._fetch(j)          # the next layers' copies overlap this layer's compute (the
                                        # ring may not exist yet when layers go to the mirror)
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self._restore(i)
        return hook

    def layer(self, i: int) -> "_LayerUse":
        """For code that calls a layer's parts directly instead of ``layer(...)``: ``with s.layer(i): ...``."""
        return _LayerUse(self, i)

    def _resident_copy(self, host: torch.Tensor) -> torch.Tensor:
        """A GPU copy of a parameter that stays for the whole call (from the mirror when it has room)."""
        n = _nbytes(host)
        if self.mirror is not None and host.is_contiguous() and n:
            buf, _ = self._mirrored(host, host.data_ptr())     # the compute stream waits for all at once
            if buf is not None:
                return buf[:n].view(host.dtype).view(host.shape)
        self.bytes_copied += n
        return host.to(self.device, non_blocking=True)      # on the compute stream, freed there

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> "Streamer":
        if self.device.type != "cuda":
            for mod, name in _param_slots(self.model):
                self.wait(getattr(mod, name).data)
            return self
        compute = self._compute = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(compute)
        for mod, name in self._layout.host_only:
            self.wait(getattr(mod, name).data)
        for mod, name in self.resident:
            p = getattr(mod, name)
            host = p.data
            self.wait(host)
            self._host[(id(mod), name)] = host
            p.data = self._resident_copy(host)
        compute.wait_stream(self.copy_stream)
        for mod, name in self._layout.buffer_slots:
            b = mod._buffers.get(name)
            if b is not None and b.device != self.device:
                self._buffers.append((mod, name, b))
                mod._buffers[name] = b.to(self.device, non_blocking=True)
        if self.layers:
            self._spans = self._layout.spans()
            if any(sp is None for sp in self._spans):
                self.point = True
            self._ring_size = self._layout.slot_bytes(self._spans)
            if self.mirror is None:
                self._ring_buffers()
            for i, layer in enumerate(self.layers):
                self._hooks.append(layer.register_forward_pre_hook(self._pre(i)))
                self._hooks.append(layer.register_forward_hook(self._post(i)))
            for j in range(min(RING, len(self.layers))):
                self._fetch(j)          # the first copies start now, while the inputs are prepared
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type != "cuda":
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for i in list(self._in_slot):
            self._restore(i)
        self._ready.clear()
        compute = torch.cuda.current_stream(self.device)
        if self.copy_stream is not None:
            compute.wait_stream(self.copy_stream)
        for mod, name in self.resident:
            getattr(mod, name).data = self._host.pop((id(mod), name))
        for mod, name, b in self._buffers:
            mod._buffers[name] = b
        self._buffers.clear()
        self._free.clear()
        self._spans = []
        self._ring = []          # freed on the compute stream, which waited for the copies
        self._ring_size = 0


class _LayerUse:
    """``Streamer.layer(i)``: layer ``i`` on the GPU inside the ``with``."""

    def __init__(self, streamer: Streamer, i: int):
        self.streamer, self.i = streamer, i

    def __enter__(self):
        s = self.streamer
        if s.layers:
            s._pre(self.i)(s.layers[self.i], ())
        return s.layers[self.i]

    def __exit__(self, *exc):
        s = self.streamer
        if s.layers:
            s._post(self.i)(s.layers[self.i], (), None)
