"""Page-locked weight reading and layer streaming (the worker's fast path).

The reading tests run anywhere; the streaming ones need a CUDA GPU and are skipped without one.
"""
import os
import threading
import time

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from i2l_ext.worker import weights  # noqa: E402
from i2l_ext.worker.streaming import Streamer, layer_lists  # noqa: E402


def _write(path, n_layers=6, dim=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    sd = {"embed.weight": torch.randn(dim, dim, generator=g).to(dtype)}
    for i in range(n_layers):
        sd[f"layers.{i}.weight"] = torch.randn(dim, dim, generator=g).to(dtype)
        sd[f"layers.{i}.bias"] = torch.randn(dim, generator=g).to(dtype)
    save_file(sd, str(path))
    return sd


class Net(torch.nn.Module):
    def __init__(self, n_layers=6, dim=64):
        super().__init__()
        self.embed = torch.nn.Linear(dim, dim, bias=False)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x):
        x = self.embed(x)
        for l in self.layers:
            x = torch.tanh(l(x))
        return x


def test_reads_every_tensor_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 4096)        # many chunks, several reader threads
    p = tmp_path / "w.safetensors"
    ref = _write(p, n_layers=20, dim=48)
    wf = weights.WeightFile(str(p), pin=False).start()
    got = wf.state_dict()
    wf.wait()
    assert wf.ready and set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert torch.equal(load_file(str(p))["layers.7.weight"], got["layers.7.weight"])


def test_one_reader_while_the_code_imports_then_all(tmp_path, monkeypatch):
    """At a cold start (FULL_SPEED cleared) one reader reads the whole file alone; the others wait
    and, once the imports are done, start and find what is left."""
    monkeypatch.setattr(weights, "CHUNK", 4096)
    monkeypatch.setattr(weights, "READERS", 4)
    monkeypatch.setattr(weights, "READERS_WHILE_IMPORTING", 1)
    p = tmp_path / "w.safetensors"
    ref = _write(p, n_layers=20, dim=48)
    weights.FULL_SPEED.clear()
    try:
        wf = weights.WeightFile(str(p), pin=False).start()
        wf.wait()
        assert wf.ready
        waiting = [t for t in wf._threads[1:] if t.is_alive()]
        assert len(waiting) == 3                       # held back, nothing read by them
        wf._threads[0].join(5)                         # (it may still be returning from its last read)
        assert not wf._threads[0].is_alive()
        assert all(t.is_alive() for t in waiting)
    finally:
        weights.FULL_SPEED.set()
    for t in wf._threads:
        t.join(5)
        assert not t.is_alive()
    got = wf.state_dict()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # a later file (the imports long done) is read by all four at once
    wf2 = weights.WeightFile(str(p), pin=False).start()
    wf2.wait()
    assert wf2.ready and len(wf2._threads) == 4


def test_partial_wait_returns_before_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 1024)
    monkeypatch.setattr(weights, "READERS", 1)
    p = tmp_path / "w.safetensors"
    _write(p, n_layers=30, dim=64)
    wf = weights.WeightFile(str(p), pin=False)
    gate = threading.Event()
    real_take = wf._take

    def slow_take():
        i = real_take()
        if i is not None and i > 2:
            gate.wait(5)
        return i
    wf._take = slow_take
    wf.start()
    first = wf.header["embed.weight"]["data_offsets"][1]
    wf.wait(min(first, 2048))                 # returns while later chunks are held back
    assert not wf.ready
    gate.set()
    wf.wait()
    assert wf.ready


def _mapping_of(address):
    """(permissions, smaps fields) of this process's mapping holding ``address``."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if "-" not in head[0] or len(head) < 5:
            continue
        lo, hi = (int(x, 16) for x in head[0].split("-"))
        if lo <= address < hi:
            fields = {}
            for more in lines[i + 1:]:
                if not more.split()[0].endswith(":"):
                    break
                k, v = more.split(":", 1)
                fields[k] = v.strip()
            return head[1], fields
    raise AssertionError("no mapping holds the buffer")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
def test_buffers_are_private_memory_in_huge_pages(tmp_path):
    """The buffer is a private mapping, so the kernel gives it transparent huge pages: a shared
    anonymous one is shmem, 4 KiB pages whatever MADV_HUGEPAGE asks (five million page faults for
    Style's weights)."""
    p = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(8 << 20, dtype=torch.uint8)}, str(p))       # 8 MiB
    wf = weights.WeightFile(str(p), pin=False).start()
    wf.wait()
    perms, fields = _mapping_of(wf.buffer.data_ptr())
    assert perms.endswith("p"), perms
    assert fields.get("Anonymous", "0 kB") != "0 kB"          # its own pages, not a file's or shmem's
    assert torch.equal(wf.tensor("w"), torch.ones(8 << 20, dtype=torch.uint8))
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else "[never]"
    if "[never]" not in thp:
        assert "hg" in fields.get("VmFlags", "").split(), fields.get("VmFlags")     # MADV_HUGEPAGE
        # what is needed for one 2 MiB page in the middle, at least, is a huge page
        assert int(fields.get("AnonHugePages", "0 kB").split()[0]) >= 2048, fields.get("AnonHugePages")
    wf.release()


def test_refuses_what_is_not_safetensors(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x80\x04\x95" + b"pickle" * 10)
    with pytest.raises(weights.NotSafetensors):
        weights.WeightFile(str(p))
    q = tmp_path / "cut.safetensors"
    _write(q)
    data = q.read_bytes()
    q.write_bytes(data[:-100])
    with pytest.raises(weights.NotSafetensors, match="truncated"):
        weights.WeightFile(str(q))


def test_layer_lists_find_the_repeated_layers():
    net = Net(n_layers=8)
    assert layer_lists(net) == [net.layers]


def test_layout_worked_out_once_and_spans_found_again_when_weights_move(tmp_path):
    """A model's streaming layout is made once (walking a decoder's modules costs a tenth of a
    second per job otherwise); each layer's host span is worked out again when its parameters
    were given other memory, and not otherwise."""
    from i2l_ext.worker.streaming import _Layout
    p = tmp_path / "w.safetensors"
    _write(p, n_layers=6, dim=32)
    wf = weights.WeightFile(str(p), pin=False).start()
    net = Net(n_layers=6, dim=32).to(torch.bfloat16)
    net.load_state_dict(wf.state_dict(), assign=True)
    wf.wait()
    lay = _Layout.of(net, True)
    assert _Layout.of(net, True) is lay and _Layout.of(net, False) is not lay
    assert lay.layers == list(net.layers) and _Layout.of(net, False).layers == []
    assert [n for _, n in lay.resident] == ["weight"] and lay.resident[0][0] is net.embed
    spans = lay.spans()
    w, b = net.layers[2].weight, net.layers[2].bias
    assert spans[2][1] == min(w.data_ptr(), b.data_ptr())
    assert spans[2][0].numel() == 32 * 32 * 2 + 32 * 2          # weight and bias, side by side
    again = lay.spans()
    assert all(x is y for x, y in zip(again, spans))            # nothing moved: the same spans
    # layer 2 loaded again from another file: its span follows, the others stay
    q = tmp_path / "v.safetensors"
    sd = _write(q, n_layers=6, dim=32)
    wf2 = weights.WeightFile(str(q), pin=False).start()
    wf2.wait()
    net.layers[2].weight.data = wf2.tensor("layers.2.weight")
    net.layers[2].bias.data = wf2.tensor("layers.2.bias")
    moved = lay.spans()
    w = net.layers[2].weight
    base = min(w.data_ptr(), net.layers[2].bias.data_ptr())
    assert moved[2] is not spans[2] and moved[2][1] == base
    at = w.data_ptr() - base
    assert torch.equal(moved[2][0][at:at + 32 * 32 * 2].view(torch.bfloat16).view(32, 32), sd["layers.2.weight"])
    assert all(moved[i] is spans[i] for i in (0, 1, 3, 4, 5))
    assert [h.data_ptr() for _, h in lay.hosts[2]] == [net.layers[2].weight.data_ptr(),
                                                        net.layers[2].bias.data_ptr()]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("layered,from_file", [(True, True), (False, True), (True, False)])
def test_streamed_equals_resident(tmp_path, layered, from_file):
    """from_file: parameters are views of one page-locked file buffer (one copy per layer);
    otherwise each parameter has its own storage (one copy per tensor)."""
    p = tmp_path / "w.safetensors"
    _write(p, n_layers=12, dim=1024)
    wf = weights.WeightFile(str(p), pin=True).start()
    net = Net(n_layers=12, dim=1024).to(torch.bfloat16)
    net.load_state_dict(wf.state_dict() if from_file else load_file(str(p)), assign=True)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    ref_net = Net(n_layers=12, dim=1024).to(torch.bfloat16)
    ref_net.load_state_dict(load_file(str(p)))
    with torch.no_grad():
        ref = ref_net.cuda()(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad(), Streamer(net, "cuda", wait=lambda t: wf.wait(), layered=layered):
        out = net(x)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    assert all(p.device.type == "cpu" for p in net.parameters())      # parked again
    peak = torch.cuda.max_memory_allocated() - base
    layer = 1024 * 1024 * 2
    if layered:
        assert peak < 5 * layer        # a couple of layers, never the 12
    else:
        assert peak >= 12 * layer


def test_plan_keeps_the_small_parts_then_the_biggest_layers_spread(tmp_path):
    """What a mirror keeps for a job: every part outside the layers first, then the model with the
    biggest layers; where only some of its layers fit, those left to the ring are spread evenly;
    the budget is never passed; a plan frees kept copies it leaves out."""
    from i2l_ext.worker.streaming import GpuMirror, _aligned, _Layout, plan_holds
    nets = []
    for name, n, dim in (("small", 8, 16), ("big", 6, 64)):
        p = tmp_path / f"{name}.safetensors"
        _write(p, n_layers=n, dim=dim)
        wf = weights.WeightFile(str(p), pin=False).start()
        wf.wait()
        net = Net(n_layers=n, dim=dim).to(torch.bfloat16)
        net.load_state_dict(wf.state_dict(), assign=True)
        nets.append((net, wf))
    (small, _), (big, _) = nets

    def key_of(t):
        return t.data_ptr(), t.numel() * t.element_size()
    residents = {key_of(small.embed.weight), key_of(big.embed.weight)}
    spans = {id(net): [(base, src.numel()) for src, base in _Layout.of(net, True).spans()] for net in (small, big)}
    big_layer, small_layer = _aligned(spans[id(big)][0][1]), _aligned(spans[id(small)][0][1])
    res_bytes = sum(_aligned(n) for _, n in residents)
    models = [(small, True, 1), (big, True, 1)]    # job order: the small model runs first
    everything = plan_holds(models, 1 << 30)
    assert everything == residents | set(spans[id(small)]) | set(spans[id(big)])
    budget = res_bytes + 3 * big_layer + 8 * small_layer
    plan = plan_holds(models, budget)
    assert plan == residents | {spans[id(big)][i] for i in (0, 2, 4)} | set(spans[id(small)])
    assert sum(_aligned(n) for _, n in plan) <= budget
    tight = plan_holds(models, res_bytes + big_layer + small_layer)
    assert tight == residents | {spans[id(big)][2], spans[id(small)][3]}      # one of each, mid-model
    assert plan_holds(models, 10) == set()
    # a model run many times over (the text encoder: once per chunk of images, for Coarse and Fine)
    # is kept before bigger layers run once
    many = plan_holds([(small, True, 20), (big, True, 1)], res_bytes + 8 * small_layer + big_layer)
    assert many == residents | set(spans[id(small)]) | {spans[id(big)][2]}
    # a model with two lists of layers: each list planned as its own group
    two = torch.nn.Module()
    two.a, two.b = big.layers, small.layers
    lay2 = _Layout.of(two, True)
    assert [len(lay2.layers[sl]) for sl in lay2.lists] == [6, 8]
    assert plan_holds([(two, True, 1)], 2 * big_layer) == {spans[id(big)][1], spans[id(big)][4]}
    m = GpuMirror("cpu", limit=1 << 30)
    for k in everything:
        m.get(*k)
    m.plan(plan)
    assert set(m._copies) == plan and m.nbytes == sum(_aligned(n) for _, n in plan)
    left_out = next(iter(everything - plan))
    assert m.get(*left_out) == (None, False)          # room, but not in the plan


@cuda
def test_kept_layers_reused_then_new_weights_streamed(tmp_path):
    """Two calls with a mirror: the second finds every layer kept (no copy, the kept views reused)
    and computes the same; after the mirror is cleared and the model given other weights, the
    result is the new weights' (nothing stale from the layout or the kept views)."""
    from i2l_ext.worker.streaming import GpuMirror
    p, q = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _write(p, n_layers=8, dim=256)
    sd_b = _write(q, n_layers=8, dim=256)
    sd_b = {k: v * 0.5 for k, v in sd_b.items()}
    save_file(sd_b, str(q))
    files = [weights.WeightFile(str(f), pin=True).start() for f in (p, q)]
    net = Net(n_layers=8, dim=256).to(torch.bfloat16)
    net.load_state_dict(files[0].state_dict(), assign=True)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)

    def ref(path):
        r = Net(n_layers=8, dim=256).to(torch.bfloat16)
        r.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            return r.cuda()(x)
    mirror = GpuMirror("cuda", limit=1 << 30)
    outs, copied = [], []
    for _ in range(2):
        s = Streamer(net, "cuda", wait=lambda t: files[0].wait(), mirror=mirror)
        with torch.no_grad(), s:
            outs.append(net(x))
        copied.append(s.bytes_copied)
    torch.cuda.synchronize()
    assert torch.equal(outs[0], ref(p)) and torch.equal(outs[1], outs[0])
    assert copied[0] > 0 and copied[1] == 0 and len(mirror.views) == 8
    assert all(p.device.type == "cpu" for p in net.parameters())
    mirror.clear()
    assert not mirror.views
    net.load_state_dict(files[1].state_dict(), assign=True)
    with torch.no_grad(), Streamer(net, "cuda", wait=lambda t: files[1].wait(), mirror=mirror):
        out = net(x)
    torch.cuda.synchronize()
    assert torch.equal(out, ref(q))
    assert all(p.device.type == "cpu" for p in net.parameters())


# ----------------------------------------------------------------------------- before torch

def test_weight_file_reads_without_torch_then_pins_in_place(tmp_path):
    """The buffer is plain anonymous memory (reading needs no torch); the torch view shares it."""
    p = tmp_path / "w.safetensors"
    sd = _write(p, n_layers=3)
    wf = weights.WeightFile(str(p), pin=True).allocate()
    assert wf._buffer is None                      # no torch tensor made just to read
    wf.start().wait()
    addr = wf.buffer.data_ptr()
    wf.pin_memory()                                # a no-op without CUDA, page-locks with it
    assert wf.buffer.data_ptr() == addr            # in place: views stay valid
    for k, v in sd.items():
        assert torch.equal(wf.tensor(k), v), k
    wf.release()
    assert wf.buffer is None and not wf.ready


def test_early_reads_need_a_gpu_and_the_ram(tmp_path, monkeypatch):
    from i2l_ext.worker import warmstart
    p = tmp_path / "w.safetensors"
    sd = _write(p)
    monkeypatch.setattr(warmstart, "gpu_likely", lambda: False)
    assert warmstart.start_reads([str(p)]) == []
    monkeypatch.setattr(warmstart, "gpu_likely", lambda: True)
    monkeypatch.setattr(warmstart, "available_ram", lambda: os.path.getsize(p) + weights.RAM_MARGIN - 1)
    assert warmstart.start_reads([str(p)]) == []
    monkeypatch.setattr(warmstart, "available_ram", lambda: 1 << 50)
    gate = threading.Event()
    files = warmstart.start_reads([str(p), str(tmp_path / "missing.safetensors")], after=gate)
    assert [f.path for f in files] == [str(p)]
    assert files[0].done_bytes == 0                # waits for the code files first
    gate.set()
    files[0].wait()
    for k, v in sd.items():
        assert torch.equal(files[0].tensor(k), v), k


def test_code_files_recorded_and_read_back(tmp_path):
    """After imports, the libraries and byte-code used are listed (torch's own library first),
    for this interpreter only, and reading them in the background finishes."""
    import json
    import sys
    from i2l_ext.worker import warmstart
    where = str(tmp_path / "code.json")
    assert warmstart.record_code(where) == where
    items = warmstart.code_files(where)
    files = [p for p, _ in items]
    assert files and all(os.path.isfile(f) for f in files)
    assert any(f.endswith(".pyc") and f"{os.sep}torch{os.sep}" in f for f in files)
    assert not any(f.startswith(str(tmp_path)) for f in files)
    if os.name != "nt":
        # shared libraries come first, torch's own first of all, as the parts this process touched
        path, ranges = items[0]
        assert f"{os.sep}torch{os.sep}" in path and ".so" in path
        size = os.path.getsize(path)
        assert ranges and all(0 <= a < size and n > 0 for a, n in ranges)
        assert sum(n for _, n in ranges) < size          # not the whole library
        libs = [(p, r) for p, r in items if r is not None]
        assert [p for p, _ in items[:len(libs)]] == [p for p, _ in libs]
    assert warmstart.warm_code(where=where).wait(120)
    assert warmstart.warm_code(where=where, advise=False).wait(120)     # read by threads instead
    data = json.load(open(where))
    data["python"] = sys.executable + "-other"
    json.dump(data, open(where, "w"))
    assert warmstart.code_files(where) == []        # another interpreter's list is not used
    assert warmstart.warm_code(where=where).is_set()


def _cached_fraction(path, n):
    """Share of the first ``n`` bytes of ``path`` in the page cache (Linux ``mincore``)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), n, access=mmap.ACCESS_COPY)
    try:
        holder = ctypes.c_char.from_buffer(m)
        pages = -(-n // 4096)
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(ctypes.addressof(holder), n, vec) == 0
        del holder
        return sum(b & 1 for b in vec.raw) / pages
    finally:
        m.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise (Linux)")
def test_code_read_ahead_reads_long_ranges_whole(tmp_path):
    """The kernel reads at most its read-ahead window per WILLNEED and drops the rest: a long
    listed range of a library is asked for in pieces, so all of it is read before the imports."""
    import json
    import sys
    from i2l_ext.worker import warmstart
    lib = tmp_path / "libbig.so"
    size = 48 << 20
    with open(lib, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(lib, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _cached_fraction(str(lib), size) > 0.05:
        pytest.skip("this file system keeps the file in memory (tmpfs)")
    want = 40 << 20                               # longer than any read-ahead window
    where = tmp_path / "code.json"
    where.write_text(json.dumps({"python": sys.executable, "files": [[str(lib), [[4096, want]]]]}))
    assert warmstart.warm_code(where=str(where)).wait(60)
    deadline = time.monotonic() + 10
    while _cached_fraction(str(lib), 4096 + want) < 0.99 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _cached_fraction(str(lib), 4096 + want) >= 0.99
    assert _cached_fraction(str(lib), size) < 0.95            # and not the rest of the file


def test_garbage_collection_paused_for_the_imports_then_frozen_and_on(monkeypatch):
    """The worker pauses the collector while it imports; when the model code is in
    (``imports_done``, whoever imported it, once or twice) what exists is frozen and it is on."""
    import gc
    from i2l_ext.worker import engine, warmstart
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        warmstart.pause_gc()
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]          # what an import would make, kept
        engine.imports_done()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)
        engine.imports_done()                      # the job's own call after the import thread's
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


# ----------------------------------------------------------------------------- O_DIRECT

def _odd_file(path, seed=1):
    """A safetensors file whose header and total size are not multiples of a page."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"t{i}": torch.randn(1000 + 37 * i, generator=g).to(torch.bfloat16) for i in range(40)}
    save_file(sd, str(path), metadata={"pad": "x" * 123})
    return sd


def _direct_works(path) -> bool:
    if not weights.DIRECT:
        return False
    try:
        os.close(os.open(str(path), os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("chunk", [4096, 8192 * 3, 1 << 20])
def test_direct_reads_are_exact_at_any_alignment(tmp_path, monkeypatch, chunk):
    """Files not in the page cache are read with O_DIRECT where the file system allows it; page
    alignment, short last pages and chunk edges give back the exact bytes."""
    monkeypatch.setattr(weights, "CHUNK", chunk)
    p = tmp_path / "w.safetensors"
    ref = _odd_file(p)
    assert os.path.getsize(p) % 4096 and weights.safetensors_header.read(str(p)).data_start % 4096
    monkeypatch.setattr(weights.WeightFile, "_in_page_cache", lambda self: False)
    wf = weights.WeightFile(str(p), pin=False).start()
    wf.wait()
    for k, v in ref.items():
        assert torch.equal(wf.tensor(k), v), k
    if _direct_works(p):
        assert wf.direct_bytes == os.path.getsize(p) - wf._base       # every byte came that way
    else:
        assert wf.direct_bytes == 0


def test_cached_files_are_copied_from_the_page_cache(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    ref = _odd_file(p, seed=2)
    p.read_bytes()                                   # now in the page cache
    wf = weights.WeightFile(str(p), pin=False)
    if weights._NOWAIT is not None and _direct_works(p):
        assert wf._in_page_cache()
    wf.start().wait()
    assert wf.direct_bytes == 0
    for k, v in ref.items():
        assert torch.equal(wf.tensor(k), v), k


def test_a_failing_direct_read_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    ref = _odd_file(p, seed=3)
    monkeypatch.setattr(weights, "CHUNK", 8192)
    monkeypatch.setattr(weights.WeightFile, "_in_page_cache", lambda self: False)
    monkeypatch.setattr(weights.WeightFile, "_open_direct", lambda self: os.open(str(p), os.O_RDONLY))
    real = os.preadv
    calls = []

    def flaky(fd, buffers, offset, *flags):
        calls.append(offset)
        if len(calls) % 3 == 0:
            raise OSError(22, "Invalid argument")
        return real(fd, buffers, offset, *flags)
    if not hasattr(os, "preadv"):
        pytest.skip("no preadv here")
    monkeypatch.setattr(os, "preadv", flaky)
    wf = weights.WeightFile(str(p), pin=False).start()
    wf.wait()
    assert calls
    for k, v in ref.items():
        assert torch.equal(wf.tensor(k), v), k


def test_truncated_while_reading_is_an_error_not_garbage(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    _odd_file(p, seed=4)
    monkeypatch.setattr(weights.WeightFile, "_in_page_cache", lambda self: False)
    wf = weights.WeightFile(str(p), pin=False)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 5000)
    wf.start()
    with pytest.raises(OSError, match="ended early"):
        wf.wait()


def test_code_read_ahead_looks_up_the_sources_of_the_byte_code(tmp_path, monkeypatch):
    """Python checks each .py beside a .pyc it uses: those lookups are done ahead too."""
    import json
    import sys
    from i2l_ext.worker import warmstart
    pkg = tmp_path / "pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "mod.py").write_text("x = 1\n")
    pyc = pkg / "__pycache__" / "mod.cpython-312.pyc"
    pyc.write_bytes(b"\0" * 64)
    where = tmp_path / "list.json"
    where.write_text(json.dumps({"python": sys.executable, "files": [[str(pyc), None]]}))
    seen = []
    real = os.stat

    def stat(p, *a, **k):
        seen.append(str(p))
        return real(p, *a, **k)
    monkeypatch.setattr(os, "stat", stat)
    assert warmstart.warm_code(where=str(where)).wait(30)
    assert str(pkg / "mod.py") in seen


def test_gpu_mirror_budget_reuse_and_clear():
    """The kept copies: found again by the host bytes they mirror, never past the budget, and
    freed by ``clear`` even while something still refers to the mirror."""
    import weakref
    from i2l_ext.worker.streaming import GpuMirror
    m = GpuMirror("cpu", limit=3 * 1024)
    a, fresh = m.get(1000, 1000)
    assert fresh and a.numel() == 1024 and m.nbytes == 1024
    again, fresh = m.get(1000, 1000)
    assert again is a and not fresh
    b, fresh = m.get(5000, 2048)
    assert fresh and m.nbytes == 3072
    assert m.get(9000, 1) == (None, False)             # over the budget: streamed instead
    m.discard(5000, 2048)
    assert m.nbytes == 1024 and len(m) == 1
    ref = weakref.ref(a)
    holder = [m]                                         # e.g. a finished stream still refers to it
    del a, again, b
    m.clear()
    assert ref() is None and m.nbytes == 0 and len(m) == 0 and holder


def test_reading_note_says_how_much_is_read_until_all_is(tmp_path, monkeypatch):
    """A first job that runs while its weights are still being read: the step's message is sent
    again with the bytes read so far, until the files are in; then nothing more."""
    from i2l_ext.contract import T
    from i2l_ext.worker.job import ReadingNote
    monkeypatch.setattr(weights, "CHUNK", 4096)
    p = tmp_path / "w.safetensors"
    _write(p, n_layers=20, dim=64)
    wf = weights.WeightFile(str(p), pin=False).allocate()
    got = []
    note = ReadingNote(lambda *a: got.append(a), period=0.05)
    note("encode", 0, 2, T("m_encoding", n=3, s="s"))
    try:
        note.watch([wf])
        time.sleep(0.4)                          # nothing read yet
        waiting = list(got[1:])
        assert waiting and all(m[:3] == ("encode", 0, 2) for m in waiting)
        gb = f"{wf.nbytes / 2 ** 30:.1f}"
        assert str(waiting[-1][3]) == f"Encoding 3 images (weights read: 0.0 of {gb} GB)"
        assert "0.0" in waiting[-1][3].render("zh_CN") and "编码" in waiting[-1][3].render("zh_CN")
        note("encode", 1, 2, T("m_encoding", n=1, s=""))     # later notes carry the step the job is at
        time.sleep(0.2)
        assert got[-1][:3] == ("encode", 1, 2) and str(got[-1][3]).startswith("Encoding 1 image (weights read: ")
        wf.start()
        wf.wait()
        assert wf.read_bytes == wf.nbytes
        time.sleep(0.2)
        count = len(got)
        time.sleep(0.3)
        assert len(got) == count                 # all read: the note has stopped
    finally:
        note.close()
    quiet = ReadingNote(lambda *a: got.append(a), period=0.01)
    quiet.watch([wf])                            # files already read: no note at all
    assert quiet._thread is None


def _cgroup(tmp_path, rel, files):
    d = tmp_path / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_the_container_memory_limit_is_what_the_worker_may_take(tmp_path):
    """A worker in a container (cgroup v2 or v1) with a memory limit counts the room under the
    tightest limit of its group and the groups above it, the page cache it may reclaim as free."""
    G = 1024 ** 3
    proc = tmp_path / "cgroup"
    proc.write_text("0::/docker/abc\n")
    _cgroup(tmp_path, "v2/docker/abc", {"memory.max": f"{32 * G}\n", "memory.current": f"{10 * G}\n",
                                        "memory.stat": f"anon {6 * G}\ninactive_file {4 * G}\n"})
    _cgroup(tmp_path, "v2/docker", {"memory.max": "max\n", "memory.current": f"{50 * G}\n"})
    assert weights.cgroup_room(str(tmp_path / "v2"), str(proc)) == 26 * G
    _cgroup(tmp_path, "v2", {"memory.max": f"{20 * G}\n", "memory.current": f"{12 * G}\n"})   # a tighter parent
    assert weights.cgroup_room(str(tmp_path / "v2"), str(proc)) == 8 * G
    proc.write_text("12:cpu,cpuacct:/x\n7:memory:/docker/abc\n0::/\n")
    _cgroup(tmp_path, "v1/memory/docker/abc", {"memory.limit_in_bytes": f"{16 * G}\n",
                                               "memory.usage_in_bytes": f"{9 * G}\n",
                                               "memory.stat": f"cache {3 * G}\ntotal_inactive_file {1 * G}\n"})
    _cgroup(tmp_path, "v1/memory", {"memory.limit_in_bytes": "9223372036854771712\n"})   # v1's "no limit"
    assert weights.cgroup_room(str(tmp_path / "v1"), str(proc)) == 8 * G
    proc.write_text("0::/\n")
    assert weights.cgroup_room(str(tmp_path / "none"), str(proc)) is None


def test_the_ram_limit_setting_sends_big_variants_to_the_disk_profile(monkeypatch):
    """``ram_limit_gb``: weights that do not fit under it with the margin are read from the disk
    as they are used (the ``disk`` profile), those that fit are kept in RAM."""
    from i2l_ext.worker import vram
    G = 1024 ** 3
    monkeypatch.setattr(weights, "RAM_LIMIT_BYTES", 32 * G)
    monkeypatch.setattr(weights, "_system_available", lambda: 100 * G)
    monkeypatch.setattr(weights, "cgroup_room", lambda: None)
    monkeypatch.setattr(weights, "_own_rss", lambda: 1 * G)
    assert weights.available_ram() == 31 * G
    assert vram.choose_profile("auto", 59 * G, dev="cuda") == "disk"          # Coarse + Fine + Bias
    assert vram.choose_profile("auto", 20 * G, dev="cuda") == "cpu_offload"   # Style
    monkeypatch.setattr(weights, "RAM_LIMIT_BYTES", None)
    assert vram.choose_profile("auto", 59 * G, dev="cuda") == "cpu_offload"
    monkeypatch.setattr(weights, "cgroup_room", lambda: 23 * G)               # a container's limit
    assert vram.choose_profile("auto", 20 * G, dev="cuda") == "disk"
