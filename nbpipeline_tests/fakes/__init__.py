"""Test doubles, kept apart from the tests that use them: a notebook backend that runs nothing
(backend), a loopback Databricks workspace over real HTTP (databricks_http, with its run
life-cycle planner databricks_runs), a scripted WorkspaceClient (databricks_sdk), and what a test
workspace starts with (databricks_workspace)."""
