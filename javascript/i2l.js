// Image to LoRA: page code for the tab (the WebUI loads this file; the standalone app runs it on load).
// Everything is attached to window so the file works both as a page script and wrapped in a function.
(function () {
    if (window.i2l_ready) return;
    window.i2l_ready = true;

    window.i2l_app = function () {
        if (typeof window.gradioApp === "function") return window.gradioApp();
        const elems = document.getElementsByTagName("gradio-app");
        const elem = elems.length ? elems[0] : document;
        return elem.shadowRoot ? elem.shadowRoot : elem;
    };

    function flash(button, ok) {
        if (!button) return;
        button.classList.add(ok ? "i2l-flash-ok" : "i2l-flash-bad");
        setTimeout(function () { button.classList.remove("i2l-flash-ok", "i2l-flash-bad"); }, 900);
    }

    // Copy text to the clipboard; falls back to a selected textarea where the API is unavailable.
    window.i2l_copy = function (text, buttonId) {
        text = text || "";
        const button = buttonId ? window.i2l_app().querySelector("#" + buttonId) : null;
        window.i2l_lastCopied = text;
        const fallback = function () {
            const ta = document.createElement("textarea");
            ta.value = text;
            ta.style.position = "fixed";
            ta.style.opacity = "0";
            document.body.appendChild(ta);
            ta.select();
            let ok = false;
            try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
            document.body.removeChild(ta);
            flash(button, ok);
        };
        if (navigator.clipboard && window.isSecureContext) {
            navigator.clipboard.writeText(text).then(function () { flash(button, true); }, fallback);
        } else {
            fallback();
        }
    };

    // Append the <lora:name:w> text to the txt2img prompt and switch to that tab (WebUI only).
    window.i2l_sendToTxt2img = function (text) {
        if (!text) return;
        const app = window.i2l_app();
        const ta = app.querySelector("#txt2img_prompt textarea");
        if (!ta) return;
        const cur = ta.value || "";
        if (cur.indexOf(text) === -1) {
            ta.value = cur.trim() ? cur.replace(/\s+$/, "") + ", " + text : text;
        }
        if (typeof window.updateInput === "function") {
            window.updateInput(ta);
        } else {
            ta.dispatchEvent(new Event("input", {bubbles: true}));
        }
        if (typeof window.switch_to_txt2img === "function") {
            window.switch_to_txt2img();
        }
    };

    // Make the host's Lora cards show new, renamed or deleted files without a restart.
    window.i2l_refreshLoraCards = function () {
        const app = window.i2l_app();
        ["txt2img", "img2img"].forEach(function (tab) {
            const b = app.querySelector("#" + tab + "_lora_extra_refresh_internal") ||
                app.querySelector("#" + tab + "_extra_refresh");
            if (b) b.click();
        });
    };

    // Hand image files to the tab's upload box, as if they had been dropped there.
    // In a WebUI: when the Image to LoRA tab is opened, start the worker and begin reading weights.
    if (typeof window.onUiTabChange === "function") {
        window.onUiTabChange(function () {
            const current = typeof window.get_uiCurrentTabContent === "function" ? window.get_uiCurrentTabContent() : null;
            if (current && current.id === "tab_i2l_tab") {
                const button = window.i2l_app().querySelector("#i2l_prewarm");
                if (button) button.click();
            }
        });
    }

    window.i2l_addFiles = function (files) {
        const input = window.i2l_app().querySelector("#i2l_upload input[type=file]");
        if (!input || !files || !files.length) return false;
        const dt = new DataTransfer();
        Array.prototype.forEach.call(files, function (f) { dt.items.add(f); });
        input.files = dt.files;
        input.dispatchEvent(new Event("change", {bubbles: true}));
        return true;
    };

    // "Add images": the upload box's own file dialog (the box itself is not shown).
    window.i2l_pickFiles = function () {
        const input = window.i2l_app().querySelector("#i2l_upload input[type=file]");
        if (input) input.click();
    };

    function imageFiles(list) {
        return Array.prototype.filter.call(list || [], function (f) {
            return !f.type || f.type.indexOf("image/") === 0;
        });
    }

    // The gallery that shows the images is where they are dropped.
    function dropZone() {
        return window.i2l_app().querySelector("#i2l_thumbs");
    }
    ["dragenter", "dragover"].forEach(function (type) {
        document.addEventListener(type, function (e) {
            const zone = dropZone();
            if (!zone || !zone.contains(e.target)) return;
            e.preventDefault();
            zone.classList.add("i2l-drop-hover");
        }, true);
    });
    ["dragleave", "drop"].forEach(function (type) {
        document.addEventListener(type, function (e) {
            const zone = dropZone();
            if (!zone || !zone.contains(e.target)) return;
            zone.classList.remove("i2l-drop-hover");
            if (type !== "drop") return;
            e.preventDefault();
            e.stopPropagation();
            const files = imageFiles(e.dataTransfer && e.dataTransfer.files);
            if (files.length) window.i2l_addFiles(files);
        }, true);
    });

    // Paste images (Ctrl+V) anywhere while the tab is visible.
    document.addEventListener("paste", function (e) {
        const zone = dropZone();
        if (!zone || zone.offsetParent === null) return;
        const data = e.clipboardData;
        if (!data) return;
        const files = [];
        Array.prototype.forEach.call(data.files || [], function (f) {
            if (f.type && f.type.indexOf("image/") === 0) files.push(f);
        });
        if (!files.length && data.items) {
            Array.prototype.forEach.call(data.items, function (it) {
                if (it.kind === "file" && it.type.indexOf("image/") === 0) {
                    const f = it.getAsFile();
                    if (f) files.push(f);
                }
            });
        }
        if (!files.length) return;
        e.preventDefault();
        window.i2l_addFiles(files);
    });
})();
