"""An interactive page for any ALBEF checkpoint: `python -m albef_hf.app --model PATH_OR_HUB_ID`.

`service` loads the checkpoint and answers requests through the albef_hf pipelines (no gradio needed); `ui`
builds the gradio page on it (the `app` extra: `pip install "albef-hf[app]"`).
"""

from .service import AlbefAppService, Gallery, load_checkpoint

__all__ = ["AlbefAppService", "Gallery", "load_checkpoint"]
