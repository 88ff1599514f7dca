"""Variants of the plain LoRA update, as pure functions of a layer (:class:`lorakit.kinds.AdapterHost`):
DoRA (:mod:`.dora`) and the inits that rewrite W, PiSSA and OLoRA (:mod:`.rewriting_inits`).
:class:`lorakit.layers.LoraLayer` calls them; they never import it."""
