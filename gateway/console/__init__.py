"""The web console: pages served by this project (no CDN) and a JSON API that calls the gateway with each user's
own API key (gateway/console/app.py)."""
