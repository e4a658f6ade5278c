// Textual Inversion extension: browser-side helpers. The tabs need none so far (token counts and
// training progress come from the server: change events and polling, see textual_inversion_ext/ui).
// Names are prefixed `tiext` so they never collide with the host's globals.
/* global onUiLoaded */
onUiLoaded(function tiextOnUiLoaded() {
    // Nothing to wire yet; kept so the host's script loading finds the file.
});
