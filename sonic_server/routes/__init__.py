"""One blueprint per area: generate + jobs, output files, the service's own description, and the
pages for people (the demo page, Swagger UI)."""
from . import generate, meta, outputs, web

BLUEPRINTS = (generate.bp, outputs.bp, meta.bp, web.bp)
