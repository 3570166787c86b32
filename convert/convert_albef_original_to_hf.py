#!/usr/bin/env python
"""Convert an original ALBEF checkpoint (salesforce/ALBEF `.pth`) into an albef-hf model folder.

    python convert/convert_albef_original_to_hf.py --checkpoint ALBEF.pth --output albef-14m \
        --tokenizer bert-base-uncased/ [--task auto] [--config configs/Pretrain.yaml] [--image-size 384]

A thin command line over `albef_hf.conversion` (see its docstring, and `--help`).
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("albef_hf") is None:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from albef_hf.conversion import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
