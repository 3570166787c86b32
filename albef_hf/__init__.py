"""ALBEF (Align before Fuse) as a native Hugging Face transformers model family."""
