"""One router per resource: search, images, annotations, codes and statistics (all under /v1, with the
token), and the system routes (health, readiness, the page and the API docs, without it)."""
