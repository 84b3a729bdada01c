"""Static site export, local server and notebook display of an atlas (the viewer)."""

from .serve import make_server, resolve_request, serve
from .site import export_atlas, export_site, notebook_html, single_file_html

__all__ = ["export_atlas", "export_site", "notebook_html", "single_file_html", "serve", "make_server", "resolve_request"]
