"""`python -m albef_hf.app --model PATH_OR_HUB_ID`: serve the interactive page of an ALBEF checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

from .service import AlbefAppService, Gallery


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m albef_hf.app",
        description="Serve a page that matches, searches, classifies and answers with an ALBEF checkpoint.",
    )
    parser.add_argument(
        "--model", required=True, help="a saved, trained or converted ALBEF folder, or a Hub id"
    )
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load a class albef_hf lacks from the checkpoint's code",
    )
    parser.add_argument(
        "--gallery", default=None, help="a folder of images to search (default: held-out synthetic scenes)"
    )
    parser.add_argument(
        "--captions", default=None, help="a caption gallery, one caption a line (for image queries)"
    )
    parser.add_argument(
        "--gallery-size", type=int, default=100, help="held-out synthetic scenes in the default gallery"
    )
    parser.add_argument("--answer-list", default=None, help="a json list of candidate answers for VQA")
    parser.add_argument("--gradcam-block", type=int, default=1, help="the ViT block of the ITC Grad-CAM")
    parser.add_argument("--top-k", type=int, default=5, help="results per search")
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to serve on (default: this machine only)"
    )
    parser.add_argument("--port", type=int, default=None, help="the port (default: a free one from 7860)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        from .ui import launch
    except ImportError as error:
        sys.exit(f"the page needs gradio ({error}): pip install 'albef-hf[app]'")
    answer_list = None
    if args.answer_list:
        with open(args.answer_list, encoding="utf-8") as handle:
            answer_list = json.load(handle)
    try:
        service = AlbefAppService.from_pretrained(
            args.model,
            answer_list=answer_list,
            trust_remote_code=args.trust_remote_code,
            revision=args.revision,
            gradcam_block=args.gradcam_block,
        )
        if args.gallery:
            service.gallery = Gallery.from_folder(args.gallery, args.captions)
        else:
            size = service.model.config.vision_config.image_size
            service.gallery = Gallery.synthetic(args.gallery_size, size)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    launch(service, args.host, args.port, block=True, top_k=args.top_k)


if __name__ == "__main__":
    main()
