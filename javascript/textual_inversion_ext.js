// Textual Inversion extension: browser-side helpers (live token counts, progress) arrive with the
// host UI. Names are prefixed `tiext` so they never collide with the host's globals.
/* global onUiLoaded */
onUiLoaded(function tiextOnUiLoaded() {
    // Nothing to wire yet; kept so the host's script loading finds the file.
});
