"""The web playground: one static page (web/index.html) that calls the API from the browser."""

from __future__ import annotations

import json
from importlib import resources

from serve_app.generation.samplers import supported_samplers


def playground_page() -> str:
    """The playground page with the supported samplers filled in."""
    page = (resources.files("serve_app.api") / "web" / "index.html").read_text(encoding="utf-8")
    return page.replace("__SUPPORTED_SAMPLERS__", json.dumps(supported_samplers()))
