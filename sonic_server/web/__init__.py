"""The demo page and the Swagger UI page (sonic_server/routes/web.py): package data only."""
