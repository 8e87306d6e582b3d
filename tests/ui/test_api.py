"""The HTTP API (/i2l/v1) over real HTTP on loopback, against ``serve`` as a user starts it (once per
gradio: FastAPI with pydantic 1 and 2). The WebUI's side is in test_host_glue.py, the login of a
server reachable from others in test_serve.py."""
from __future__ import annotations

import os

from ui_helpers import api, api_wait, b64


def test_api_makes_a_lora_end_to_end(app, sample_images):
    base = app.url
    status, v = api(base, "GET", "/version")
    assert status == 200 and v["api"] == 1
    status, variants = api(base, "GET", "/variants")
    style = next(x for x in variants if x["id"] == "style")
    assert status == 200 and style["ready"] is True and style["missing"] == [] and style["base_model"] == "Qwen-Image"
    status, models = api(base, "GET", "/models")
    assert status == 200 and any(m["role"] == "style" and m["present"] for m in models)
    status, spec = api(base, "GET", "/openapi.json")
    assert status == 200 and "JobIn" in str(spec["components"]["schemas"])     # the models documented

    images = [b64(p) for p in sample_images["images"][:2]]
    images[1] = "data:image/png;base64," + images[1]
    status, job = api(base, "POST", "/jobs", {"images": images, "name": "api_style", "weight": 0.8,
                                              "activation_text": "api style", "max_rank": 5})
    assert status == 202 and job["state"] in ("queued", "starting", "running") and job["id"]
    job = api_wait(base, job["id"])
    assert job["state"] == "done", job
    r = job["result"]
    assert r["prompt"] == "<lora:api_style:0.8>" and r["images"] == 2 and r["rank"] == 5     # capped from 8
    assert os.path.basename(r["path"]) == "api_style.safetensors" and job["log"]
    status, png = api(base, "GET", r["preview_url"][len("/i2l/v1"):])
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert app.files() == ["api_style.json", "api_style.preview.png", "api_style.safetensors"]

    status, loras = api(base, "GET", "/loras")
    assert status == 200 and [x["name"] for x in loras] == ["api_style"] and loras[0]["images"] == 2
    status, renamed = api(base, "PATCH", "/loras/api_style", {"name": "api_renamed"})
    assert status == 200 and renamed["name"] == "api_renamed", renamed
    assert app.files() == ["api_renamed.json", "api_renamed.preview.png", "api_renamed.safetensors"]
    status, gone = api(base, "DELETE", "/loras/api_renamed")
    assert status == 200 and sorted(gone["deleted"]) == sorted(
        ["api_renamed.json", "api_renamed.preview.png", "api_renamed.safetensors"])
    assert app.files() == []


def test_api_refuses_bad_requests_with_one_error_shape(app, sample_images):
    base, good = app.url, b64(sample_images["images"][0])

    def refused(body, status, code, path="/jobs", method="POST", headers=None):
        got, answer = api(base, method, path, body, headers=headers)
        assert got == status and answer["error"]["code"] == code and answer["error"]["message"], (body, answer)
        return answer["error"]

    refused({"images": ["%%% not base64"], "name": "x"}, 400, "bad_input")
    e = refused({"images": [b64(sample_images["text"])], "name": "x"}, 400, "bad_input")
    assert "PNG" in e["message"] and e["fix"]
    refused({"images": [good] * 65, "name": "x"}, 400, "bad_input")                 # too many
    refused({"images": [], "name": "x"}, 400, "bad_input")
    refused({"images": [good], "name": "a/b"}, 400, "bad_input")
    refused({"images": [good], "name": "x", "variant": "nope"}, 400, "bad_input")
    refused({"images": [good], "name": "x", "subfolder": "../out"}, 400, "bad_input")   # no way out of the folder
    refused({"images": [good]}, 400, "bad_input")                                       # no name: FastAPI's check
    refused({"images": [good], "name": "x", "weight": "heavy"}, 400, "bad_input")
    refused({"images": [good], "name": "x", "max_rank": 0}, 400, "bad_input")
    with open(os.path.join(app.lora_dir, "taken.safetensors"), "wb") as f:
        f.write(b"someone else's")
    e = refused({"images": [good], "name": "taken"}, 409, "name_taken",
                headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    assert "taken" in e["message"] and any("\u4e00" <= ch <= "\u9fff" for ch in e["message"])   # in Chinese
    os.remove(os.path.join(app.lora_dir, "taken.safetensors"))
    refused(None, 404, "not_found", "/jobs/nope", "GET")
    refused(None, 404, "not_found", "/loras/nope", "DELETE")
    refused({"name": "y"}, 404, "not_found", "/loras/../../etc/passwd", "PATCH")
    assert app.files() == []                                                          # nothing made, nothing left


def test_api_jobs_wait_in_the_tabs_queue(slow_app, sample_images):
    base, good = slow_app.url, b64(sample_images["images"][0])
    status, first = api(base, "POST", "/jobs", {"images": [good], "name": "first"})
    assert status == 202
    status, second = api(base, "POST", "/jobs", {"images": [good], "name": "second"})
    assert status == 202 and second["state"] == "queued" and second["position"] == 0
    status, jobs = api(base, "GET", "/jobs")
    assert [j["id"] for j in jobs][-2:] == [first["id"], second["id"]]
    status, second = api(base, "POST", f"/jobs/{second['id']}/cancel")
    assert status == 200 and second["state"] == "cancelled"
    status, first = api(base, "POST", f"/jobs/{first['id']}/cancel")
    assert status == 200 and first["state"] == "cancelled"
    assert slow_app.files() == []
