"""The main job: pretrain a small ALBEF on the built-in synthetic world, evaluate it, save it, report.

Run it with `make demo` or `python -m albef_hf.demo`; every default lives in `DemoConfig`.
"""

from .config import DemoConfig
from .run import DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
