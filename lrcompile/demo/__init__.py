"""The real-model demo (``lrcompile demo``): all-MiniLM-L6-v2 with its corpora."""
