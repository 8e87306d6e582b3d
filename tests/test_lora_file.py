"""The LoRA writer (i2l_ext.worker.lora_file): files the real safetensors library reads back
exactly, laid out as its own writer lays them out, written without copying the tensors."""
import json
import os
import struct

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from i2l_ext import lora_format  # noqa: E402
from i2l_ext.worker import lora_file  # noqa: E402


def _lora_in_one_buffer(n_modules=6, rank=3, dim=40):
    """A LoRA as the engine hands it over: every tensor a view into one flat bf16 buffer."""
    shapes = []
    for i in range(n_modules):
        key = f"transformer_blocks.{i}.attn.to_q.lora_A.default.weight"
        shapes += [(key, (rank, dim)), (key.replace("lora_A", "lora_B"), (dim + i, rank))]
    total = sum(a * b for _, (a, b) in shapes)
    buf = torch.randn(total, dtype=torch.float32).to(torch.bfloat16)
    out, off = {}, 0
    for k, s in shapes:
        out[k] = buf[off:off + s[0] * s[1]].view(s)
        off += s[0] * s[1]
    return out, buf


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_the_safetensors_library_reads_back_every_tensor_and_the_metadata(tmp_path, fmt):
    lora, _ = _lora_in_one_buffer()
    state = lora_format.build_state_dict(lora, fmt, scalar=lambda r: torch.tensor(float(r), dtype=torch.float32))
    meta = {"i2l.variant": "style", "modelspec.title": "a \"quoted\" title, 中文"}
    path = tmp_path / "x.safetensors"
    size = lora_file.write(str(path), state, meta)
    assert size == path.stat().st_size
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
        assert set(f.keys()) == set(state)
        for k in state:
            got = f.get_tensor(k)
            assert got.dtype == state[k].dtype and tuple(got.shape) == tuple(state[k].shape), k
            assert torch.equal(got, state[k]), k
    if fmt == "kohya":
        alphas = [k for k in state if k.endswith(".alpha")]
        assert len(alphas) == 6 and all(load_file(str(path))[k].item() == 3.0 for k in alphas)


def test_same_tensors_as_save_file_and_aligned_as_it_aligns(tmp_path):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(5, 7, generator=g)                       # float32
    state = {"b.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
             "a.f32": wide,
             "c.odd": torch.randn(1, 3, generator=g).to(torch.bfloat16),     # 6 bytes: the next would misalign
             "d.t": torch.randn(4, 6, generator=g).to(torch.bfloat16).t(),     # not contiguous
             "e.scalar": torch.tensor(2.0),
             "f.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
             "g.i64": torch.arange(5)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    lora_file.write(str(ours), state, {"k": "v"})
    save_file({k: v.contiguous() for k, v in state.items()}, str(theirs), metadata={"k": "v"})
    a, b = load_file(str(ours)), load_file(str(theirs))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    header, start = _header(ours)
    assert start % 8 == 0
    sizes = {"F32": 4, "BF16": 2, "I64": 8}
    ranges = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ranges[0][0] == 0 and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    assert start + ranges[-1][1] == ours.stat().st_size
    for k, v in header.items():
        if k != "__metadata__":
            assert v["data_offsets"][0] % sizes[v["dtype"]] == 0, k


def test_views_of_one_buffer_go_out_as_one_write(tmp_path, monkeypatch):
    lora, buf = _lora_in_one_buffer(dim=4000)
    assert buf.numel() * 2 > lora_file.SMALL
    runs = lora_file._runs(list(lora.values()))
    assert len(runs) == 1 and runs[0].numel() == buf.numel() * 2
    # A gap (one tensor left out) splits the run; separate tensors are separate runs.
    keys = list(lora)
    assert len(lora_file._runs([lora[k] for k in keys[:2] + keys[3:]])) == 2
    assert len(lora_file._runs([torch.ones(3), torch.ones(3)])) == 2

    writes = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def write(self, mv):
            writes.append(len(mv))
            return self.f.write(mv)

        def fileno(self):
            return self.f.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(lora_file, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(lora_file.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    lora_file.write(str(tmp_path / "y.safetensors"), lora, {"a": "b"})
    assert len(writes) == 2 and writes[1] == buf.numel() * 2     # the header, then the whole buffer
    assert len(synced) == 1                                     # on the disk before it is renamed


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "z.safetensors"
    with pytest.raises(ValueError, match="strings"):
        lora_file.write(str(path), {"a": torch.ones(2)}, {"n": 3})
    with pytest.raises(ValueError, match="complex"):
        lora_file.write(str(path), {"a": torch.ones(2, dtype=torch.complex64)})
    assert not path.exists()
