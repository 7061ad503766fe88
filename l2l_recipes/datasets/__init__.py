"""The image datasets, one module each: where the files are, how they are decoded and cached,
the class split (data.DATASETS names them; data.load_split is the entry point)."""
