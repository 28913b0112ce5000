"""The coordinator: holds candidates in Postgres, leases batches, serves the REST API."""
