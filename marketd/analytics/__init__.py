"""The analytics side of the one-command run: embedded PostgreSQL and the Spark jobs' launcher."""
