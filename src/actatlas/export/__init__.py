"""Static site export, local server and notebook display of an atlas (the viewer)."""

from .serve import make_server, resolve_request, serve
from .site import AtlasView, export_atlas, export_atlases, export_site, notebook_html, save_site, show, single_file_html

__all__ = ["export_atlases", "export_atlas", "export_site", "notebook_html", "single_file_html", "show", "save_site", "AtlasView",
           "serve", "make_server", "resolve_request"]
