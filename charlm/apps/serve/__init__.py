"""`charlm serve`: the HTTP server (server.py), its generation jobs (jobs.py) and the page it serves (page/)."""
