"""The bundled offline defaults: the synthetic ARC-format sample, its generator, and the pre-trained tiny base."""
