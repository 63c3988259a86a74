"""End-to-end tests: whole runs in step processes, `dagster dev` and the browser, several
processes, engine kills. Most are marked `slow` or `ui` and stay out of the fast tier."""
