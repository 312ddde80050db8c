"""Running the coordinator's jobs on Ray: connection, shared base weights, job actors, scheduling."""
