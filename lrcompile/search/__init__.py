"""``--rank auto``: per-layer spectra and sensitivities (``sensitivity``), then the allocation path
bisected with end-to-end measurements (``auto``)."""
