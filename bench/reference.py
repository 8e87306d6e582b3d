"""The reference: DiffSynth's official i2L examples, on the same files, timed.

What the official Qwen-Image example does (``examples/qwen_image/model_inference/Qwen-Image-i2L.py``):
``QwenImagePipeline.from_pretrained`` with the encoders and decoders, then
``QwenImageUnit_Image2LoRAEncode`` + ``QwenImageUnit_Image2LoRADecode`` under ``torch.no_grad()``,
for Coarse + Fine also the Bias file loaded with ``load_state_dict`` and ``merge_lora``, then
``save_file``. The Z-Image one (``examples/z_image/model_inference/Z-Image-i2L.py``):
``ZImagePipeline.from_pretrained`` with SigLIP2, DINOv3 and the Z-Image-i2L decoder, then
``ZImageUnit_Image2LoRAEncode`` + ``ZImageUnit_Image2LoRADecode`` and ``save_file``; its DiT, text
encoder, VAE and tokenizer serve only the image generation after it and are left out here
(``tokenizer_config=None``). Here the files are given by path (``ModelConfig(path=...)``, no hub
contact) and the images are the bench's PNG files.

    python3 bench/reference.py --models DIR --variant style|coarse-fine|z-image --mode disk|gpu|cpu \
        --images a.png,b.png,... [--out result.json] [--device cuda]

Modes: ``disk`` is the official Qwen-Image-i2L low-VRAM configuration (layers streamed from the
safetensors files; for Z-Image the same configuration, so the columns compare alike), ``gpu``
keeps every model resident (as both official full-VRAM examples), ``cpu`` (Z-Image only, not in
the default run) is the official Z-Image-i2L low-VRAM example's: weights offloaded to RAM, each
layer copied to the GPU when it computes (``vram_limit=0``). One process per measurement: the
first LoRA counts from the process's start (the parent passes its spawn time in I2L_BENCH_SPAWN;
else the first line of this file). Runs: the images twice (the second is the warm repeat), then
the first image alone twice. ``--device cpu`` checks the script on a machine without a GPU
(no VRAM figures).
"""
import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files_for(models: str, variant: str) -> dict:
    sys.path.insert(0, ROOT)
    from i2l_ext import catalog
    roles = catalog.get_variant(variant).needed_roles(True if variant == "coarse-fine" else None)
    out = {}
    for r in roles:
        paths = catalog.FILES[r].resolve(models)
        if not paths:
            raise SystemExit(f"missing {r}: {catalog.FILES[r].local_path(models)}")
        out[r] = paths
    sys.path.remove(ROOT)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--variant", default="style", choices=["style", "coarse-fine", "z-image"])
    ap.add_argument("--mode", default="disk", choices=["disk", "gpu", "cpu"])
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--device", default="cuda", help="cpu: check the script without a GPU")
    a = ap.parse_args()
    if a.mode == "cpu" and a.variant != "z-image":
        ap.error("--mode cpu is the Z-Image-i2L low-VRAM example's; Qwen-Image's has disk")
    zimage = a.variant == "z-image"
    spawn = float(os.environ.get("I2L_BENCH_SPAWN") or T0)
    files = files_for(a.models, a.variant)

    t = time.time()
    import torch
    if zimage:
        from diffsynth.pipelines.z_image import (ZImagePipeline as Pipeline, ModelConfig,
                                                 ZImageUnit_Image2LoRAEncode as Encode,
                                                 ZImageUnit_Image2LoRADecode as Decode)
    else:
        from diffsynth.pipelines.qwen_image import (QwenImagePipeline as Pipeline, ModelConfig,
                                                    QwenImageUnit_Image2LoRAEncode as Encode,
                                                    QwenImageUnit_Image2LoRADecode as Decode)
    from diffsynth.utils.lora import merge_lora
    from diffsynth import load_state_dict
    from safetensors.torch import save_file
    from PIL import Image
    t_import = time.time() - t

    dev = a.device
    cuda = dev.startswith("cuda")
    if not cuda and not hasattr(torch.cpu, "empty_cache"):   # diffsynth's offloading calls it on the CPU
        torch.cpu.empty_cache = lambda: None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    vram_limit = None
    if a.mode == "disk":      # the official example's vram_config_disk_offload
        vc = {"offload_dtype": "disk", "offload_device": "disk", "onload_dtype": "disk", "onload_device": "disk",
              "preparing_dtype": torch.bfloat16, "preparing_device": dev,
              "computation_dtype": torch.bfloat16, "computation_device": dev}
        vram_limit = (torch.cuda.mem_get_info(dev)[1] / (1024 ** 3) - 0.5) if cuda else None
    elif a.mode == "cpu":     # examples/z_image/model_inference_low_vram/Z-Image-i2L.py
        vc = {"offload_dtype": torch.bfloat16, "offload_device": "cpu", "onload_dtype": torch.bfloat16,
              "onload_device": "cpu", "preparing_dtype": torch.bfloat16, "preparing_device": dev,
              "computation_dtype": torch.bfloat16, "computation_device": dev}
        vram_limit = 0 if cuda else None
    else:
        vc = {}
    t = time.time()
    order = ["text_encoder", "siglip2", "dinov3", "style", "coarse", "fine", "z_image"]
    configs = [ModelConfig(path=files[r] if len(files[r]) > 1 else files[r][0], **vc) for r in order if r in files]
    if zimage:                # no tokenizer: it serves the image generation only (and would be downloaded)
        pipe = Pipeline.from_pretrained(torch_dtype=torch.bfloat16, device=dev, model_configs=configs,
                                        tokenizer_config=None, vram_limit=vram_limit)
    else:
        pipe = Pipeline.from_pretrained(
            torch_dtype=torch.bfloat16, device=dev, model_configs=configs, tokenizer_config=None,
            processor_config=ModelConfig(path=files["processor"][0]) if "processor" in files else None,
            vram_limit=vram_limit)
    sync()
    t_load = time.time() - t

    paths = a.images.split(",")
    runs = []
    first_done = None
    lora = None
    plan = [("all", paths), ("all", paths), ("one", paths[:1]), ("one", paths[:1])]
    for i, (kind, ps) in enumerate(plan):
        sync()
        t = time.time()
        images = [Image.open(p) for p in ps]
        with torch.no_grad():
            embs = Encode().process(pipe, image2lora_images=images)
            sync()
            t_enc = time.time() - t
            lora = Decode().process(pipe, **embs)["lora"]
            if "bias" in files:
                bias = load_state_dict(files["bias"][0], torch_dtype=torch.bfloat16, device=dev)
                lora = merge_lora([lora, bias])
        out = os.path.join(a.tmp, f"i2l_ref_{a.variant}_{a.mode}_{i}.safetensors")
        save_file({k: v.contiguous() for k, v in lora.items()}, out)
        sync()
        done = time.time()
        if first_done is None:
            first_done = done
        runs.append({"images": len(ps), "encode_s": round(t_enc, 3), "total_s": round(done - t, 3),
                     "bytes": os.path.getsize(out)})
        if i:
            os.remove(out)          # the first (all the images) stays, for bench/compare.py
    del embs
    held_allocated = torch.cuda.memory_allocated() if cuda else None
    held_reserved = torch.cuda.memory_reserved() if cuda else None
    rank = next(v.shape[0] for k, v in lora.items() if ".lora_A." in k)
    res = {
        "variant": a.variant, "mode": a.mode, "images": len(paths),
        "import_s": round(t_import, 2), "load_s": round(t_load, 2), "runs": runs,
        "first_lora_s": round(first_done - spawn, 2),
        "start_to_import_s": round(T0 - spawn, 2),
        "warm_s": runs[1]["total_s"], "warm_1_s": min(r["total_s"] for r in runs[2:]),
        "peak_vram": torch.cuda.max_memory_allocated() if cuda else None, "held_allocated": held_allocated,
        "held_reserved": held_reserved, "keys": len(lora), "rank_last": rank,
        "file_bytes": runs[0]["bytes"], "gpu": torch.cuda.get_device_name() if cuda else dev,
        "torch": torch.__version__,
    }
    line = json.dumps(res)
    print(line, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
