"""The Databricks integration: one room for the workspace client, notebook sync, run polling,
the Databricks `NotebookBackend`, and the Databricks-native jobs (specs, deploy, runs, bundle).

Modules: `client` (credentials, workspace client, API errors), `sync` (workspace notebooks),
`polling` (waiting for and cancelling runs), `backend` (`DatabricksNotebookBackend`), `quartz`
(cron to Quartz), `kinds` (the jobs' names and kinds), `jobs` (job settings), `deploy`, `runs`
(run-now and run timings), `bundle`.
"""
