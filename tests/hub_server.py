"""A Hub-compatible server for the tests: olah serving, over the Hub API, the git repositories of a folder.

Run as `python hub_server.py --config olah.toml` with a Python that has olah (a PyPI package); the config names
the folder (`mirrors-path`: `<folder>/models/<org>/<name>` are git repositories), the address and offline mode.

olah (0.5.4) answers a request for a file or folder that a repository on disk does not hold with 401 "Repository
not found", where the Hub answers 404 "Entry not found". transformers probes optional files (a slow tokenizer's
`vocab.txt`, chat templates, ...) and treats "not found" as "absent", but "repository not found" as fatal. This
launcher runs olah unchanged except for one middleware that gives the Hub's answer in exactly that case: a 401
for a repository that exists on disk becomes 404 with `X-Error-Code: EntryNotFound`.
"""

from __future__ import annotations

import os
import re

from olah import server
from starlette.responses import JSONResponse

# /api/models/<org>/<name>/... (API) and /<org>/<name>/resolve/... (files)
_REPOSITORY = re.compile(
    r"^/(?:api/models/)?(?P<org>[^/]+)/(?P<name>[^/]+)/(?:resolve|tree|revision|paths-info)"
)


def _served_from_disk(path: str) -> bool:
    match = _REPOSITORY.match(path)
    if match is None:
        return False
    mirrors = server.app.state.app_settings.config.mirrors_path
    return any(os.path.isdir(os.path.join(root, "models", match["org"], match["name"])) for root in mirrors)


@server.app.middleware("http")
async def missing_entries_are_not_missing_repositories(request, call_next):
    response = await call_next(request)
    if response.status_code == 401 and _served_from_disk(request.url.path):
        message = "Entry not found"
        return JSONResponse(
            {"error": message},
            status_code=404,
            headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": message},
        )
    return response


if __name__ == "__main__":
    server.cli()
