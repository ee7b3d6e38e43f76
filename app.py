"""Serve the sonic API: python app.py [--host H] [--port P] [--config settings.yaml]

Host and port also come from SONIC_HOST / SONIC_PORT; default 127.0.0.1:5000. The model loads
once, here, before the first request. For production: waitress-serve --call server:create_app (README).
"""
import argparse
import logging
import os

from werkzeug.serving import WSGIRequestHandler

from sonic import load_config
from server import create_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--config", help="settings YAML (default configs/default.yaml)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    config = load_config(a.config)
    host = a.host or os.environ.get("SONIC_HOST") or config["server"]["host"]
    port = a.port or int(os.environ.get("SONIC_PORT") or config["server"]["port"])
    app = create_app(config, background_load=True)   # answers /health while the models load

    class Handler(WSGIRequestHandler):
        # a client that stops sending (slow upload, idle keep-alive) is dropped after this long
        timeout = float(config["server"].get("socket_timeout_s", 30))

    app.run(host=host, port=port, threaded=True, use_reloader=False, request_handler=Handler)


if __name__ == "__main__":
    main()
