"""The service for a WSGI server: `waitress-serve --call sonic_server.wsgi:make_app`.

`create_app` leaves logging to whoever embeds it; a WSGI server sets up none (waitress), so
here the service logs as under `sonic serve`: INFO lines to stderr (each request, each job's
end) in `server.log_format`, and a settings file (SONIC_CONFIG) or folder it cannot use is one line, not a traceback.
"""

from __future__ import annotations

import sys

from flask import Flask

from sonic.errors import SonicError
from sonic.settings import SettingsError

from . import create_app
from .host_limits import check_host
from .logs import configure_logging
from .settings import load_settings

SELECT_CEILING = 1024  # FD_SETSIZE


def make_app() -> Flask:
    configure_logging()
    try:
        settings = load_settings()  # SONIC_CONFIG and the variables
        configure_logging(settings.server.log_format)  # before the app logs its start
        # waitress's select() (without --asyncore-use-poll) fails at a handle numbered 1024 or
        # more, and ends the server: the limit is raised that far only
        check_host(settings, runs_here=not settings.server.redis_url, open_files_ceiling=SELECT_CEILING)
        return create_app(settings)
    except SettingsError as e:
        sys.exit(f"error: {e}")
    except SonicError as e:  # a folder it cannot write, the accounts database, ...
        sys.exit(f"error: {e.message}")
