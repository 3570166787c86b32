"""``python -m albef_hf.data.synthetic``: render and row-generation speed on this machine."""

from .export import main

main()
