"""WebUI glue: before the WebUI generates an image, the Image to LoRA worker lets go of the VRAM
it kept after its last job (the weights it held on the GPU for a next job stay in RAM).

Adds no controls: an always-on script whose ``process`` runs before sampling, in txt2img and
img2img alike. Does nothing when no worker is running or it holds nothing.
"""
import sys

from modules import scripts


class ImageToLoraFreeGpu(scripts.Script):
    def title(self):
        return "Image to LoRA: free the GPU before generating"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        if "i2l_ext" not in sys.modules:        # the tab's script did not load: no worker either
            return
        try:
            from i2l_ext import hosts
            hosts.park_worker()
        except Exception as e:      # never stands in the way of the WebUI's own generation
            print(f"[Image to LoRA] could not free the worker's VRAM: {e}")
