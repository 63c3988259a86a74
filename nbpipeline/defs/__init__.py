"""What Dagster shows: assets, checks, jobs, schedules, sensors and their resources."""
