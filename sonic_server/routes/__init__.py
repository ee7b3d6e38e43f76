"""One blueprint per area: generate + jobs, output files, the service's own description, face
fusion, and the pages for people (the demo page, Swagger UI)."""

from . import fusion, generate, meta, outputs, web

BLUEPRINTS = (generate.bp, outputs.bp, meta.bp, fusion.bp, web.bp)
