"""Serve the sonic API: python app.py [--host H] [--port P] [--config settings.yaml]

The same as `sonic serve` (see sonic_server/serve.py). For production:
waitress-serve --call sonic_server:create_app (README).
"""
from sonic_server.serve import main

if __name__ == "__main__":
    main()
