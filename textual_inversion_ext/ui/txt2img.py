"""Inside A1111: copy the txt2img tab's generation settings into the Train tab's preview fields (in the
browser; the host exposes no server-side handle on another tab's components)."""

from __future__ import annotations

# The preview fields the host's "Copy from txt2img" fills, in the order COPY_TXT2IMG_JS returns them.
COPY_FIELDS = ("preview_prompt", "preview_negative", "preview_sampler", "preview_steps", "preview_cfg",
               "preview_seed", "preview_width", "preview_height")
# Reads A1111's txt2img fields from the page (ids from its modules/ui.py, ui_toprow.py and the Seed script);
# a field not found, or a random seed (-1), keeps the current value. Radio or dropdown sampler both work.
COPY_TXT2IMG_JS = """(...current) => {
    const app = typeof gradioApp === 'function' ? gradioApp() : document;
    const q = (selector) => app.querySelector(selector);
    const text = (id) => { const e = q(`#${id} textarea`); return e ? e.value : null; };
    const number = (...ids) => {
        for (const id of ids) {
            const e = q(`#${id} input[type=number]`) || q(`#${id} input`);
            const v = e ? parseFloat(e.value) : NaN;
            if (Number.isFinite(v)) return v;
        }
        return null;
    };
    const sampler = () => {
        const radio = q('#txt2img_sampling input:checked');
        if (radio) return radio.value;
        const box = q('#txt2img_sampling input');
        return box && box.value ? box.value : null;
    };
    const seed = number('txt2img_seed', 'script_txt2img_seed_seed');
    const found = [text('txt2img_prompt'), text('txt2img_neg_prompt'), sampler(), number('txt2img_steps'),
                   number('txt2img_cfg_scale'), seed !== null && seed >= 0 ? seed : null,
                   number('txt2img_width'), number('txt2img_height')];
    return found.map((value, i) => value === null ? current[i] : value);
}"""
