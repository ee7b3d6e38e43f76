"""One blueprint per area: generate + jobs, output files, and the service's own description."""
from . import generate, meta, outputs

BLUEPRINTS = (generate.bp, outputs.bp, meta.bp)
